import { describe, expect, it } from 'vitest'
import { contentRange, parseRange } from '../../src/oci/range.js'
import { digestOf, parseDigest, sha256Of, tryParseDigest } from '../../src/oci/digest.js'
import { accepts, parseAccept, sniffManifestMediaType, MediaType } from '../../src/oci/media-types.js'
import { OciError } from '../../src/errors.js'

function err (fn: () => unknown): string | undefined {
  try { fn() } catch (e) { return e instanceof OciError ? `${e.status} ${e.code}` : String(e) }
  return undefined
}

describe('parseRange', () => {
  it('parses the three single-range forms against the size', () => {
    expect(parseRange(undefined, 100)).toBeUndefined()
    expect(parseRange('bytes=0-9', 100)).toEqual({ start: 0, end: 9 })
    expect(parseRange('bytes=90-', 100)).toEqual({ start: 90, end: 99 })
    expect(parseRange('bytes=-10', 100)).toEqual({ start: 90, end: 99 })
    expect(parseRange('bytes=-1000', 100)).toEqual({ start: 0, end: 99 })
    expect(parseRange('bytes=50-5000', 100)).toEqual({ start: 50, end: 99 })
    expect(contentRange({ start: 0, end: 9 }, 100)).toBe('bytes 0-9/100')
  })
  it('refuses malformed and multi ranges with 400, unsatisfiable with 416', () => {
    for (const h of ['bytes=', 'bytes=-', 'bytes=a-b', 'items=0-1', 'bytes=5-1', 'bytes=0-1,3-4', 'bytes=1.5-2']) expect(err(() => parseRange(h, 100)), h).toBe('400 RANGE_INVALID')
    for (const h of ['bytes=100-', 'bytes=200-300', 'bytes=-0', 'bytes=99999999999999999999-']) expect(err(() => parseRange(h, 100)), h).toBe('416 RANGE_INVALID')
    expect(err(() => parseRange('bytes=0-', 0))).toBe('416 RANGE_INVALID')
    try { parseRange('bytes=100-', 100) } catch (e) { expect((e as OciError).headers['content-range']).toBe('bytes */100') }
  })
})

describe('digests', () => {
  it('accepts sha256 and sha512 of the exact length, lower-case hex only', () => {
    expect(tryParseDigest(`sha256:${'0'.repeat(64)}`)).toBeDefined()
    expect(tryParseDigest(`sha512:${'0'.repeat(128)}`)).toBeDefined()
    for (const d of [`sha256:${'0'.repeat(65)}`, `sha256:${'g'.repeat(64)}`, `sha1:${'0'.repeat(40)}`, 'sha256:', ':abc', `SHA256:${'0'.repeat(64)}`]) {
      expect(tryParseDigest(d), d).toBeUndefined()
      expect(err(() => parseDigest(d))).toBe('400 DIGEST_INVALID')
    }
  })
  it('hashes with the algorithm of the digest', () => {
    const buf = Buffer.from('hello')
    expect(sha256Of(buf)).toBe('sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824')
    const d512 = parseDigest(`sha512:${'0'.repeat(128)}`)
    expect(digestOf(buf, d512)).toMatch(/^sha512:[0-9a-f]{128}$/)
  })
})

describe('media types', () => {
  it('parses Accept, dropping parameters and q=0', () => {
    expect(parseAccept('application/vnd.oci.image.index.v1+json, application/json;q=0.5, text/html;q=0')).toEqual(['application/vnd.oci.image.index.v1+json', 'application/json'])
    expect(parseAccept(['a/b', 'c/d'])).toEqual(['a/b', 'c/d'])
    expect(accepts([], MediaType.ociIndex)).toBe(true)
    expect(accepts(['*/*'], MediaType.ociIndex)).toBe(true)
    expect(accepts([MediaType.dockerManifest], MediaType.ociIndex)).toBe(false)
  })
  it('sniffs a manifest type from its JSON', () => {
    expect(sniffManifestMediaType(Buffer.from(JSON.stringify({ mediaType: MediaType.dockerManifestList, manifests: [] })))).toBe(MediaType.dockerManifestList)
    expect(sniffManifestMediaType(Buffer.from(JSON.stringify({ schemaVersion: 2, manifests: [] })))).toBe(MediaType.ociIndex)
    expect(sniffManifestMediaType(Buffer.from(JSON.stringify({ schemaVersion: 2, config: {}, layers: [] })))).toBe(MediaType.ociManifest)
    expect(sniffManifestMediaType(Buffer.from('not json'))).toBeUndefined()
  })
})
