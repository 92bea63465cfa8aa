import { OciError } from '../errors.js'

/** An image reference as users write it: `nginx`, `nginx:1.25`, `ghcr.io/org/img:tag`, `img@sha256:...`. */
export interface ImageRef {
  /** The registry host (a configured upstream name), or undefined for the daemon's default upstream. */
  registry?: string
  /** The repository path as written (the daemon adds `library/` for Docker Hub). */
  repo: string
  /** A tag or a digest. Defaults to `latest`. */
  reference: string
}

/**
 * Parses a Docker-style image reference. A first component with a dot or colon, or `localhost`,
 * is the registry. Only syntax is checked here; the daemon validates names, tags and digests.
 */
export function parseImageRef (s: string): ImageRef {
  const input = s.trim()
  if (input === '' || /\s/.test(input)) throw bad(s)
  let rest = input
  let registry: string | undefined
  const slash = rest.indexOf('/')
  if (slash > 0) {
    const first = rest.slice(0, slash)
    if (first.includes('.') || first.includes(':') || first === 'localhost') {
      registry = first
      rest = rest.slice(slash + 1)
    }
  }
  let reference = 'latest'
  const at = rest.indexOf('@')
  if (at >= 0) {
    reference = rest.slice(at + 1)
    rest = rest.slice(0, at)
  } else {
    const colon = rest.lastIndexOf(':')
    if (colon > rest.lastIndexOf('/')) {
      reference = rest.slice(colon + 1)
      rest = rest.slice(0, colon)
    }
  }
  if (rest === '' || reference === '') throw bad(s)
  return { ...(registry !== undefined ? { registry } : {}), repo: rest, reference }
}

export function formatImageRef (r: ImageRef): string {
  const name = r.registry !== undefined ? `${r.registry}/${r.repo}` : r.repo
  return r.reference.includes(':') ? `${name}@${r.reference}` : `${name}:${r.reference}`
}

function bad (s: string): OciError {
  return new OciError('NAME_INVALID', 400, 'invalid image reference', { image: s.slice(0, 300), expected: '[registry/]repository[:tag|@digest]' })
}
