// The pure parts of `pullmesh prefetch`: image references, image lists, platforms, manifests.
import { describe, expect, it } from 'vitest'
import {
  PrefetchError, PrefetchUsageError, formatPlatform, parseImage, parseImageList, parseManifest, parsePlatform,
  platformMatches, selectManifests, shortDigest,
} from '../../src/cli/prefetch.js'
import { MediaType } from '../../src/oci/media-types.js'

const D = `sha256:${'a'.repeat(64)}`
const E = `sha256:${'b'.repeat(64)}`
const F = `sha256:${'c'.repeat(64)}`

describe('parseImage', () => {
  it.each([
    ['nginx', undefined, 'nginx', 'latest'],
    ['nginx:1.25', undefined, 'nginx', '1.25'],
    ['library/nginx:1.25', undefined, 'library/nginx', '1.25'],
    ['ghcr.io/org/img:tag', 'ghcr.io', 'org/img', 'tag'],
    ['ghcr.io/org/sub/img', 'ghcr.io', 'org/sub/img', 'latest'],
    [`img@${D}`, undefined, 'img', D],
    [`ghcr.io/org/img:tag@${D}`, 'ghcr.io', 'org/img', D],
    ['host:5000/org/img:tag', 'host:5000', 'org/img', 'tag'],
    ['127.0.0.1:5001/app', '127.0.0.1:5001', 'app', 'latest'],
    ['localhost/app:v1', 'localhost', 'app', 'v1'],
    ['Docker.IO/library/redis:7', 'docker.io', 'library/redis', '7'],
    ['  redis:7-alpine  ', undefined, 'redis', '7-alpine'],
    // one component with a dot and no slash is a repository, as in Docker
    ['my.app:1', undefined, 'my.app', '1'],
  ])('%s', (input, registry, repo, reference) => {
    const img = parseImage(input)
    expect(img).toMatchObject({ name: input.trim(), registry, repo, reference })
    expect(img.digest).toBe(reference.startsWith('sha256:') ? reference : undefined)
  })

  it.each([
    ['', /not an image reference/],
    ['Nginx', /invalid repository name/],
    ['org/Img:tag', /invalid repository name/],
    ['nginx:', /not an image reference/],
    ['nginx:-bad', /invalid tag/],
    ['img@sha256:1234', /invalid digest/],
    [`img@md5:${'a'.repeat(32)}`, /invalid digest/],
    ['ghcr.io/', /not an image reference|invalid repository/],
    ['bad_host.io/app', /not a registry host/],
    [`img:bad!tag@${D}`, /invalid tag/],
    ['two words', /not an image reference/],
  ])('refuses %j', (input, message) => {
    expect(() => parseImage(input)).toThrow(PrefetchUsageError)
    expect(() => parseImage(input)).toThrow(message)
  })
})

describe('parseImageList', () => {
  it('skips comments and blank lines, keeping line numbers', () => {
    const text = '# images for the offline demo\nnginx:1.25\n\n  ghcr.io/org/img:tag   # the app\r\n#redis\n\t\nalpine\n'
    expect(parseImageList(text)).toEqual([
      { line: 2, text: 'nginx:1.25' },
      { line: 4, text: 'ghcr.io/org/img:tag' },
      { line: 7, text: 'alpine' },
    ])
  })
})

describe('platforms', () => {
  it('parses os/arch[/variant], normalising case and aliases', () => {
    expect(parsePlatform('linux/amd64')).toEqual({ os: 'linux', architecture: 'amd64' })
    expect(parsePlatform('Linux/ARM/v7')).toEqual({ os: 'linux', architecture: 'arm', variant: 'v7' })
    expect(parsePlatform('linux/x86_64')).toEqual({ os: 'linux', architecture: 'amd64' })
    expect(parsePlatform('linux/aarch64')).toEqual({ os: 'linux', architecture: 'arm64' })
    expect(formatPlatform(parsePlatform('linux/arm64/v8'))).toBe('linux/arm64/v8')
  })

  it.each(['linux', 'linux/', '/amd64', 'linux/arm/v7/x', 'linux amd64', ''])('refuses %j', s => {
    expect(() => parsePlatform(s)).toThrow(PrefetchUsageError)
  })

  it('matches like containerd: no variant asked takes any, arm64 means v8 and arm means v7', () => {
    const want = (s: string): ReturnType<typeof parsePlatform> => parsePlatform(s)
    expect(platformMatches(want('linux/arm64'), { os: 'linux', architecture: 'arm64', variant: 'v8' })).toBe(true)
    expect(platformMatches(want('linux/arm64/v8'), { os: 'linux', architecture: 'arm64' })).toBe(true)
    expect(platformMatches(want('linux/arm'), { os: 'linux', architecture: 'arm', variant: 'v6' })).toBe(true)
    expect(platformMatches(want('linux/arm/v7'), { os: 'linux', architecture: 'arm', variant: 'v6' })).toBe(false)
    expect(platformMatches(want('linux/arm/v7'), { os: 'linux', architecture: 'arm' })).toBe(true)
    expect(platformMatches(want('linux/amd64'), { os: 'linux', architecture: 'arm64' })).toBe(false)
    expect(platformMatches(want('linux/amd64'), { os: 'windows', architecture: 'amd64' })).toBe(false)
    expect(platformMatches(want('linux/amd64'), { os: 'linux', architecture: 'x86_64' })).toBe(true)
    expect(platformMatches(want('linux/amd64'), undefined)).toBe(false)
  })

  const index = [
    { digest: D, platform: { os: 'linux', architecture: 'amd64' } },
    { digest: E, platform: { os: 'linux', architecture: 'arm64', variant: 'v8' } },
    { digest: F, platform: { os: 'unknown', architecture: 'unknown' } }, // a buildx attestation
  ]

  it('selects every entry when no platform is asked for', () => {
    expect(selectManifests(index, []).map(e => e.digest)).toEqual([D, E, F])
  })

  it('selects the entries of the platforms asked for', () => {
    expect(selectManifests(index, [parsePlatform('linux/arm64')]).map(e => e.digest)).toEqual([E])
    expect(selectManifests(index, [parsePlatform('linux/arm64'), parsePlatform('linux/amd64')]).map(e => e.digest)).toEqual([D, E])
    expect(selectManifests(index, [parsePlatform('linux/s390x')])).toEqual([])
  })
})

describe('parseManifest', () => {
  const enc = (o: unknown): Buffer => Buffer.from(JSON.stringify(o))

  it('reads an index with its platforms', () => {
    const m = parseManifest(enc({
      schemaVersion: 2,
      mediaType: MediaType.ociIndex,
      manifests: [
        { mediaType: MediaType.ociManifest, digest: D, size: 10, platform: { os: 'linux', architecture: 'arm', variant: 'v7' } },
        { mediaType: MediaType.ociManifest, digest: E, size: 11 },
      ],
    }), MediaType.ociIndex)
    expect(m).toEqual({
      kind: 'index',
      manifests: [
        { digest: D, size: 10, mediaType: MediaType.ociManifest, platform: { os: 'linux', architecture: 'arm', variant: 'v7' } },
        { digest: E, size: 11, mediaType: MediaType.ociManifest },
      ],
    })
  })

  it('reads config and layers of an image manifest, skipping non-distributable layers', () => {
    const m = parseManifest(enc({
      schemaVersion: 2,
      config: { mediaType: 'application/vnd.oci.image.config.v1+json', digest: D, size: 2 },
      layers: [
        { mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip', digest: E, size: 3 },
        { mediaType: 'application/vnd.docker.image.rootfs.foreign.diff.tar.gzip', digest: F, size: 4, urls: ['https://example.invalid/x'] },
      ],
    }), MediaType.dockerManifest)
    expect(m).toMatchObject({ kind: 'image', skipped: 1, blobs: [{ digest: D, size: 2 }, { digest: E, size: 3 }] })
  })

  it('reads schema1 layers, once each', () => {
    const m = parseManifest(enc({ schemaVersion: 1, fsLayers: [{ blobSum: D }, { blobSum: E }, { blobSum: D }] }), MediaType.dockerManifestV1Signed)
    expect(m).toEqual({ kind: 'image', skipped: 0, blobs: [{ digest: D, size: undefined, mediaType: undefined }, { digest: E, size: undefined, mediaType: undefined }] })
  })

  it.each([
    ['not JSON', Buffer.from('{nope')],
    ['a bad digest', enc({ config: { digest: 'sha256:xyz', size: 1 }, layers: [] })],
    ['a missing size', enc({ config: { digest: D }, layers: [] })],
    ['neither config nor manifests', enc({ schemaVersion: 2 })],
  ])('refuses %s with PM_MANIFEST_INVALID', (_what, body) => {
    let caught: unknown
    try { parseManifest(body, undefined) } catch (err) { caught = err }
    expect(caught).toBeInstanceOf(PrefetchError)
    expect((caught as PrefetchError).code).toBe('PM_MANIFEST_INVALID')
  })
})

it('shortDigest keeps the algorithm and 12 hex digits', () => {
  expect(shortDigest(D)).toBe('sha256:aaaaaaaaaaaa…')
})
