import { OciError, nameInvalid, nameUnknown, unsupported } from '../errors.js'
import { type Digest, isDigestLike, parseDigest } from './digest.js'

/** A validated repository path, e.g. `library/nginx`. Only parseRepoName creates one. */
export type RepoName = string & { readonly __brand: 'RepoName' }
/** A validated tag. */
export type Tag = string & { readonly __brand: 'Tag' }

const COMPONENT = /^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*$/
const TAG = /^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$/
const MAX_NAME = 255

export function parseRepoName (s: string): RepoName {
  if (s.length === 0 || s.length > MAX_NAME) throw nameInvalid({ name: s.slice(0, 300), reason: 'length must be 1..255' })
  for (const c of s.split('/')) {
    if (!COMPONENT.test(c)) throw nameInvalid({ name: s, reason: `invalid path component "${c.slice(0, 100)}"` })
  }
  return s as RepoName
}

export function parseTag (s: string): Tag {
  if (!TAG.test(s)) throw new OciError('MANIFEST_INVALID', 400, 'invalid tag', { tag: s.slice(0, 200) })
  return s as Tag
}

export type Reference = { kind: 'tag', tag: Tag } | { kind: 'digest', digest: Digest }

export function parseReference (s: string): Reference {
  if (s.includes(':') || isDigestLike(s)) return { kind: 'digest', digest: parseDigest(s) }
  return { kind: 'tag', tag: parseTag(s) }
}

/** Where a request goes: which configured upstream, and the repository there. */
export interface Target { upstream: string, repo: RepoName }

/** Upstream names that mean Docker Hub, whose one-component names live under `library/`. */
const DOCKER_HUB = new Set(['docker.io', 'registry-1.docker.io', 'index.docker.io'])

export interface RoutingInit {
  /** Configured upstream names, e.g. `docker.io`, `ghcr.io`, `127.0.0.1:5001`. */
  upstreams: ReadonlySet<string>
  /** The upstream used when neither `?ns=` nor a host-like first component names one. */
  defaultUpstream: string
}

/**
 * Decides the upstream and repository for a request path name, the way real clients address a mirror:
 * `?ns=` (containerd) wins; else a first component with a dot or colon (or `localhost`) names the upstream;
 * else the default upstream. Docker Hub gets `library/` for one-component names.
 */
export function resolveTarget (rawName: string, ns: string | undefined, init: RoutingInit): Target {
  let upstream: string
  let name = rawName
  const slash = rawName.indexOf('/')
  const first = slash === -1 ? rawName : rawName.slice(0, slash)
  if (ns !== undefined && ns !== '') {
    upstream = canonicalUpstream(ns, init)
  } else if (slash !== -1 && (first.includes('.') || first.includes(':') || first === 'localhost')) {
    upstream = canonicalUpstream(first, init)
    name = rawName.slice(slash + 1)
  } else {
    upstream = init.defaultUpstream
  }
  if (!init.upstreams.has(upstream)) {
    throw nameUnknown({ upstream: upstream.slice(0, 200), reason: 'this upstream registry is not configured on the mirror' })
  }
  if (DOCKER_HUB.has(upstream) && !name.includes('/')) name = `library/${name}`
  return { upstream, repo: parseRepoName(name) }
}

function canonicalUpstream (name: string, init: RoutingInit): string {
  const n = name.toLowerCase()
  if (init.upstreams.has(n)) return n
  if (DOCKER_HUB.has(n)) for (const u of DOCKER_HUB) if (init.upstreams.has(u)) return u
  return n
}

export type RegistryRoute =
  | { kind: 'base' }
  | { kind: 'manifest', name: string, reference: string }
  | { kind: 'blob', name: string, digest: string }
  | { kind: 'tags', name: string }
  | { kind: 'referrers', name: string, digest: string }

/**
 * Parses the path of a `/v2/...` request from the raw (undecoded) URL path. Percent-encoding never
 * appears in valid names, tags or digests, so any `%` is refused: this closes encoded-slash and
 * encoded-dot traversal before anything is decoded.
 */
export function parseRegistryPath (rawPath: string): RegistryRoute {
  if (rawPath === '/v2' || rawPath === '/v2/') return { kind: 'base' }
  if (rawPath.includes('%') || rawPath.includes('\\') || rawPath.includes('//')) {
    throw nameInvalid({ path: rawPath.slice(0, 300), reason: 'encoded or empty path components are not allowed' })
  }
  if (rawPath.split('/').some(c => c === '..' || c === '.')) {
    throw nameInvalid({ path: rawPath.slice(0, 300), reason: 'dot path components are not allowed' })
  }
  if (/^\/v2\/.+\/blobs\/uploads(?:\/.*)?$/.test(rawPath)) throw unsupported({ reason: 'push is not supported' })
  if (rawPath === '/v2/_catalog') {
    throw unsupported({ reason: 'a pull-through mirror has no catalog: list one repository with /v2/<name>/tags/list' })
  }
  const listing = /^\/v2\/(.+)\/(?:tags\/(list)|referrers\/([^/]+))$/.exec(rawPath)
  if (listing !== null) {
    return listing[2] === 'list' ? { kind: 'tags', name: listing[1]! } : { kind: 'referrers', name: listing[1]!, digest: listing[3]! }
  }
  const m = /^\/v2\/(.+)\/(manifests|blobs)\/([^/]+)$/.exec(rawPath)
  if (m === null) throw new OciError('NAME_INVALID', 404, 'unknown registry path', { path: rawPath.slice(0, 300) })
  const [, name = '', kind, ref = ''] = m
  return kind === 'manifests' ? { kind: 'manifest', name, reference: ref } : { kind: 'blob', name, digest: ref }
}
