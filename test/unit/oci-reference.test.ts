import { describe, expect, it } from 'vitest'
import { parseRegistryPath, parseReference, parseRepoName, resolveTarget } from '../../src/oci/reference.js'
import { OciError } from '../../src/errors.js'

const routing = { upstreams: new Set(['docker.io', 'ghcr.io', '127.0.0.1:5001']), defaultUpstream: 'docker.io' }

function ociCode (fn: () => unknown): string | undefined {
  try { fn() } catch (e) { return e instanceof OciError ? `${e.status} ${e.code}` : `non-oci ${String(e)}` }
  return undefined
}

describe('parseRegistryPath', () => {
  it('parses base, manifests and blobs, taking the last keyword as the split', () => {
    expect(parseRegistryPath('/v2/')).toEqual({ kind: 'base' })
    expect(parseRegistryPath('/v2/library/nginx/manifests/latest')).toEqual({ kind: 'manifest', name: 'library/nginx', reference: 'latest' })
    expect(parseRegistryPath('/v2/a/blobs/b/blobs/sha256:x')).toEqual({ kind: 'blob', name: 'a/blobs/b', digest: 'sha256:x' })
    expect(parseRegistryPath('/v2/ghcr.io/org/img/manifests/v1')).toEqual({ kind: 'manifest', name: 'ghcr.io/org/img', reference: 'v1' })
  })
  it('refuses traversal, encoded slashes and dots, and empty components', () => {
    for (const p of ['/v2/../etc/manifests/x', '/v2/a/./b/manifests/x', '/v2/a%2Fb/manifests/x', '/v2/a%2e%2e/manifests/x', '/v2/a//b/manifests/x', '/v2/a\\b/manifests/x']) {
      expect(ociCode(() => parseRegistryPath(p)), p).toBe('400 NAME_INVALID')
    }
  })
  it('refuses push and listing as UNSUPPORTED', () => {
    expect(ociCode(() => parseRegistryPath('/v2/a/blobs/uploads/'))).toBe('405 UNSUPPORTED')
    expect(ociCode(() => parseRegistryPath('/v2/a/blobs/uploads/123'))).toBe('405 UNSUPPORTED')
    expect(ociCode(() => parseRegistryPath('/v2/_catalog'))).toBe('405 UNSUPPORTED')
    expect(parseRegistryPath('/v2/ghcr.io/org/img/tags/list')).toEqual({ kind: 'tags', name: 'ghcr.io/org/img' })
    expect(parseRegistryPath('/v2/org/img/referrers/sha256:abc')).toEqual({ kind: 'referrers', name: 'org/img', digest: 'sha256:abc' })
    expect(parseRegistryPath('/v2/org/referrers/manifests/v1')).toEqual({ kind: 'manifest', name: 'org/referrers', reference: 'v1' })
  })
  it('answers unknown paths with a 404 OCI error', () => {
    expect(ociCode(() => parseRegistryPath('/v2/a/other/x'))).toBe('404 NAME_INVALID')
  })
})

describe('parseRepoName and parseReference', () => {
  it('accepts spec names and refuses the rest', () => {
    expect(parseRepoName('library/nginx')).toBe('library/nginx')
    expect(parseRepoName('a-b__c.d/e')).toBe('a-b__c.d/e')
    for (const n of ['', 'UPPER', 'a/', '/a', 'a..b', '-a', 'a_', 'a'.repeat(256), 'a b']) {
      expect(ociCode(() => parseRepoName(n)), n).toBe('400 NAME_INVALID')
    }
  })
  it('tells tags from digests and validates both', () => {
    expect(parseReference('latest')).toEqual({ kind: 'tag', tag: 'latest' })
    const d = `sha256:${'a'.repeat(64)}`
    expect(parseReference(d)).toEqual({ kind: 'digest', digest: d })
    expect(ociCode(() => parseReference(`sha256:${'a'.repeat(63)}`))).toBe('400 DIGEST_INVALID')
    expect(ociCode(() => parseReference(`sha256:${'A'.repeat(64)}`))).toBe('400 DIGEST_INVALID')
    expect(ociCode(() => parseReference(`md5:${'a'.repeat(32)}`))).toBe('400 DIGEST_INVALID')
    expect(ociCode(() => parseReference('.bad'))).toBe('400 MANIFEST_INVALID')
    expect(ociCode(() => parseReference('a'.repeat(129)))).toBe('400 MANIFEST_INVALID')
  })
})

describe('resolveTarget: how real clients address a mirror', () => {
  it('sends Docker registry-mirrors paths to the default upstream, with library/ for one component', () => {
    expect(resolveTarget('nginx', undefined, routing)).toEqual({ upstream: 'docker.io', repo: 'library/nginx' })
    expect(resolveTarget('library/nginx', undefined, routing)).toEqual({ upstream: 'docker.io', repo: 'library/nginx' })
    expect(resolveTarget('org/app', undefined, routing)).toEqual({ upstream: 'docker.io', repo: 'org/app' })
  })
  it('follows containerd ?ns=', () => {
    expect(resolveTarget('org/img', 'ghcr.io', routing)).toEqual({ upstream: 'ghcr.io', repo: 'org/img' })
    expect(resolveTarget('library/test', '127.0.0.1:5001', routing)).toEqual({ upstream: '127.0.0.1:5001', repo: 'library/test' })
    expect(resolveTarget('nginx', 'docker.io', routing)).toEqual({ upstream: 'docker.io', repo: 'library/nginx' })
    expect(resolveTarget('nginx', 'registry-1.docker.io', routing)).toEqual({ upstream: 'docker.io', repo: 'library/nginx' })
  })
  it('takes a host-like first component as the upstream', () => {
    expect(resolveTarget('ghcr.io/org/img', undefined, routing)).toEqual({ upstream: 'ghcr.io', repo: 'org/img' })
    expect(resolveTarget('docker.io/nginx', undefined, routing)).toEqual({ upstream: 'docker.io', repo: 'library/nginx' })
  })
  it('is never an open proxy', () => {
    expect(ociCode(() => resolveTarget('evil.example/x', undefined, routing))).toBe('404 NAME_UNKNOWN')
    expect(ociCode(() => resolveTarget('x/y', 'evil.example', routing))).toBe('404 NAME_UNKNOWN')
  })
})
