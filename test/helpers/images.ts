// Build OCI image layouts offline (no network, no external tools except skopeo
// for pushing). Layers are tar files written byte by byte here and gzipped with
// node:zlib; their content comes from crypto.randomBytes so that no two layers,
// images or test runs deduplicate by accident.
import { createHash, randomBytes } from 'node:crypto'
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { gzipSync } from 'node:zlib'
import { run } from './exec.js'

export const MT_MANIFEST = 'application/vnd.oci.image.manifest.v1+json'
export const MT_INDEX = 'application/vnd.oci.image.index.v1+json'
export const MT_CONFIG = 'application/vnd.oci.image.config.v1+json'
export const MT_LAYER = 'application/vnd.oci.image.layer.v1.tar+gzip'

export interface BlobDesc {
  mediaType: string
  digest: string
  size: number
}

export interface PlatformImage {
  arch: string
  os: string
  manifest: BlobDesc
  config: BlobDesc
  layers: BlobDesc[]
}

export interface BuiltImage {
  /** The OCI layout directory (oci:DIR:TAG). */
  layoutDir: string
  /** The tag inside the layout (org.opencontainers.image.ref.name). */
  tag: string
  /** Digest of the top-level manifest: the image manifest, or the image index for a multi-arch build. */
  manifestDigest: string
  mediaType: string
  /** Configs and layers of every platform (no manifests). */
  blobs: BlobDesc[]
  /** Every manifest, the index first when there is one. */
  manifests: BlobDesc[]
  platforms: PlatformImage[]
  /** Sum of all blob and manifest sizes. */
  totalBytes: number
  cleanup: () => Promise<void>
}

export interface BuildOptions {
  /** Number of layers per platform. Default 2. */
  layers?: number
  /** Random payload bytes per layer (gzip does not shrink them). Default 1 MiB. */
  layerBytes?: number
  /** Payload bytes of each layer, one entry per layer (overrides `layers` and `layerBytes`). */
  layerSizes?: number[]
  arch?: string
  os?: string
  tag?: string
  /** Parent directory for the layout; default a fresh mkdtemp under the OS tmpdir. */
  dir?: string
}

export interface MultiArchOptions extends Omit<BuildOptions, 'arch'> {
  platforms?: string[]
  /** Per-platform layer payload sizes (overrides `layerSizes`, `layers` and `layerBytes` for that platform). */
  platformLayerSizes?: Record<string, number[]>
}

const sha256 = (b: Buffer | string): string => 'sha256:' + createHash('sha256').update(b).digest('hex')

// ---------------------------------------------------------------- tar writer

function octal (n: number, width: number): string {
  // width includes the trailing NUL
  return n.toString(8).padStart(width - 1, '0') + '\0'
}

function tarHeader (name: string, size: number, type: '0' | '5', mode: number, mtime: number): Buffer {
  if (Buffer.byteLength(name) > 100) throw new Error(`tar name too long: ${name}`)
  const h = Buffer.alloc(512, 0)
  h.write(name, 0, 100, 'utf8')
  h.write(octal(mode, 8), 100, 8, 'ascii')
  h.write(octal(0, 8), 108, 8, 'ascii') // uid
  h.write(octal(0, 8), 116, 8, 'ascii') // gid
  h.write(octal(size, 12), 124, 12, 'ascii')
  h.write(octal(mtime, 12), 136, 12, 'ascii')
  h.write('        ', 148, 8, 'ascii') // checksum placeholder: spaces
  h.write(type, 156, 1, 'ascii')
  h.write('ustar\0', 257, 6, 'ascii')
  h.write('00', 263, 2, 'ascii')
  h.write('root', 265, 32, 'ascii')
  h.write('root', 297, 32, 'ascii')
  let sum = 0
  for (const b of h) sum += b
  h.write(sum.toString(8).padStart(6, '0') + '\0 ', 148, 8, 'ascii')
  return h
}

interface TarEntry { name: string, data?: Buffer, dir?: boolean }

/** A POSIX ustar archive of the entries, with the two zero blocks at the end. */
export function makeTar (entries: TarEntry[], mtime = 1_700_000_000): Buffer {
  const parts: Buffer[] = []
  for (const e of entries) {
    if (e.dir === true) {
      parts.push(tarHeader(e.name.endsWith('/') ? e.name : e.name + '/', 0, '5', 0o755, mtime))
      continue
    }
    const data = e.data ?? Buffer.alloc(0)
    parts.push(tarHeader(e.name, data.length, '0', 0o644, mtime), data)
    const pad = (512 - (data.length % 512)) % 512
    if (pad > 0) parts.push(Buffer.alloc(pad, 0))
  }
  parts.push(Buffer.alloc(1024, 0))
  return Buffer.concat(parts)
}

// ---------------------------------------------------------------- layout writer

class LayoutWriter {
  constructor (readonly dir: string) {}

  async init (): Promise<void> {
    await mkdir(join(this.dir, 'blobs', 'sha256'), { recursive: true })
    await writeFile(join(this.dir, 'oci-layout'), JSON.stringify({ imageLayoutVersion: '1.0.0' }))
  }

  async put (mediaType: string, bytes: Buffer): Promise<BlobDesc> {
    const digest = sha256(bytes)
    await writeFile(join(this.dir, 'blobs', 'sha256', digest.slice('sha256:'.length)), bytes)
    return { mediaType, digest, size: bytes.length }
  }

  async writeIndex (top: BlobDesc, tag: string, platform?: { architecture: string, os: string }): Promise<void> {
    const index = {
      schemaVersion: 2,
      mediaType: MT_INDEX,
      manifests: [{
        ...top,
        ...(platform !== undefined ? { platform } : {}),
        annotations: { 'org.opencontainers.image.ref.name': tag },
      }],
    }
    await writeFile(join(this.dir, 'index.json'), JSON.stringify(index))
  }
}

async function buildPlatform (w: LayoutWriter, arch: string, os: string, sizes: number[]): Promise<PlatformImage> {
  const created = new Date().toISOString()
  const layerDescs: BlobDesc[] = []
  const diffIds: string[] = []
  const history: Array<{ created: string, created_by: string }> = []
  const nonce = randomBytes(8).toString('hex')
  for (let i = 0; i < sizes.length; i++) {
    const tar = makeTar([
      { name: `layer${i}`, dir: true },
      { name: `layer${i}/id.txt`, data: Buffer.from(`pullmesh test layer ${i} ${arch} ${nonce}\n`) },
      { name: `layer${i}/data.bin`, data: randomBytes(sizes[i]!) },
    ])
    diffIds.push(sha256(tar))
    layerDescs.push(await w.put(MT_LAYER, gzipSync(tar, { level: 1 })))
    history.push({ created, created_by: `pullmesh-test layer ${i}` })
  }
  const config = {
    created,
    architecture: arch,
    os,
    config: { Env: ['PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'], Cmd: ['/bin/true'] },
    rootfs: { type: 'layers', diff_ids: diffIds },
    history,
  }
  const configDesc = await w.put(MT_CONFIG, Buffer.from(JSON.stringify(config)))
  const manifest = { schemaVersion: 2, mediaType: MT_MANIFEST, config: configDesc, layers: layerDescs }
  const manifestDesc = await w.put(MT_MANIFEST, Buffer.from(JSON.stringify(manifest)))
  return { arch, os, manifest: manifestDesc, config: configDesc, layers: layerDescs }
}

function layerSizesOf (o: BuildOptions): number[] {
  return o.layerSizes ?? Array.from({ length: o.layers ?? 2 }, () => o.layerBytes ?? 1 << 20)
}

function total (descs: BlobDesc[]): number {
  return descs.reduce((a, d) => a + d.size, 0)
}

async function layoutDirFor (o: { dir?: string }): Promise<{ dir: string, cleanup: () => Promise<void> }> {
  const dir = o.dir !== undefined ? await mkdtemp(join(o.dir, 'oci-')) : await mkdtemp(join(tmpdir(), 'pullmesh-oci-'))
  return { dir, cleanup: async () => { await rm(dir, { recursive: true, force: true }) } }
}

/** A single-platform image: `layers` random gzip layers, a config and an OCI manifest. */
export async function buildImage (o: BuildOptions = {}): Promise<BuiltImage> {
  const { dir, cleanup } = await layoutDirFor(o)
  const w = new LayoutWriter(dir)
  await w.init()
  const tag = o.tag ?? '1'
  const p = await buildPlatform(w, o.arch ?? 'amd64', o.os ?? 'linux', layerSizesOf(o))
  await w.writeIndex(p.manifest, tag)
  const blobs = [p.config, ...p.layers]
  return {
    layoutDir: dir,
    tag,
    manifestDigest: p.manifest.digest,
    mediaType: MT_MANIFEST,
    blobs,
    manifests: [p.manifest],
    platforms: [p],
    totalBytes: total(blobs) + p.manifest.size,
    cleanup,
  }
}

/** An OCI image index with one image manifest per platform (random layers each). */
export async function buildMultiArchImage (o: MultiArchOptions = {}): Promise<BuiltImage> {
  const { dir, cleanup } = await layoutDirFor(o)
  const w = new LayoutWriter(dir)
  await w.init()
  const tag = o.tag ?? '1'
  const os = o.os ?? 'linux'
  const platforms: PlatformImage[] = []
  for (const arch of o.platforms ?? ['amd64', 'arm64']) {
    platforms.push(await buildPlatform(w, arch, os, o.platformLayerSizes?.[arch] ?? layerSizesOf(o)))
  }
  const index = {
    schemaVersion: 2,
    mediaType: MT_INDEX,
    manifests: platforms.map(p => ({ ...p.manifest, platform: { architecture: p.arch, os: p.os } })),
  }
  const indexDesc = await w.put(MT_INDEX, Buffer.from(JSON.stringify(index)))
  await w.writeIndex(indexDesc, tag)
  const blobs = platforms.flatMap(p => [p.config, ...p.layers])
  const manifests = [indexDesc, ...platforms.map(p => p.manifest)]
  return {
    layoutDir: dir,
    tag,
    manifestDigest: indexDesc.digest,
    mediaType: MT_INDEX,
    blobs,
    manifests,
    platforms,
    totalBytes: total(blobs) + total(manifests),
    cleanup,
  }
}

/**
 * Push a layout into a registry with skopeo. `ref` is `HOST:PORT/repo:tag`
 * (no transport prefix). `all` copies every platform of an index. Digests
 * are preserved (skopeo fails instead of rewriting a manifest).
 */
export async function pushImage (layoutDir: string, ref: string, o: { all?: boolean, tag?: string } = {}): Promise<void> {
  const args = ['copy', '--quiet', '--dest-tls-verify=false', '--preserve-digests']
  if (o.all === true) args.push('--all')
  args.push(`oci:${layoutDir}:${o.tag ?? '1'}`, `docker://${ref}`)
  await run('skopeo', args, { timeoutMs: 120_000 })
}

// ---------------------------------------------------------------- verification

export interface DirCheck {
  /** Digests of files found and verified (by name for a `dir:` copy, by content for a store). */
  verified: string[]
}

/**
 * Verify a `skopeo copy ... dir:OUT` directory: every file named like a sha256
 * hex hashes to its name, the `manifest.json` (or, with --all, every manifest)
 * hashes to a known manifest digest, and every expected blob is present.
 */
export async function verifySkopeoDir (out: string, expected: { blobs: BlobDesc[], manifests: BlobDesc[] }): Promise<DirCheck> {
  const files = await readdir(out)
  const present = new Map<string, string>() // digest → file
  const bad: string[] = []
  for (const f of files) {
    const bytes = await readFile(join(out, f))
    const got = sha256(bytes)
    if (/^[0-9a-f]{64}$/.test(f)) {
      if (got !== 'sha256:' + f) bad.push(`${f}: content hashes to ${got}`)
      present.set(got, f)
    } else if (f === 'manifest.json' || /^[0-9a-f]{64}\.manifest\.json$/.test(f) || /manifest.*\.json$/.test(f)) {
      if (f !== 'manifest.json' && f.includes('.manifest.json') && got !== 'sha256:' + f.slice(0, 64)) {
        bad.push(`${f}: content hashes to ${got}`)
      }
      present.set(got, f)
    }
  }
  for (const b of expected.blobs) {
    const f = present.get(b.digest)
    if (f === undefined) bad.push(`missing blob ${b.digest}`)
  }
  for (const m of expected.manifests) {
    if (!present.has(m.digest)) bad.push(`missing manifest ${m.digest} (files: ${files.join(', ')})`)
  }
  if (bad.length > 0) throw new Error(`skopeo dir ${out} failed verification:\n  ${bad.join('\n  ')}`)
  return { verified: [...present.keys()] }
}

export function allDigests (img: BuiltImage): string[] {
  return [...img.manifests, ...img.blobs].map(d => d.digest)
}

/**
 * Verify an OCI layout written by `skopeo copy ... oci:DIR:TAG`: every file in
 * blobs/sha256 hashes to its name, and every expected blob and manifest is there.
 * (An `oci:` destination lets skopeo download layers in parallel; `dir:` is serial.)
 */
export async function verifyOciLayout (dir: string, expected: { blobs: BlobDesc[], manifests: BlobDesc[] }): Promise<DirCheck> {
  const blobDir = join(dir, 'blobs', 'sha256')
  const present = new Set<string>()
  const bad: string[] = []
  for (const f of await readdir(blobDir)) {
    const got = sha256(await readFile(join(blobDir, f)))
    if (got !== 'sha256:' + f) bad.push(`${f}: content hashes to ${got}`)
    else present.add(got)
  }
  for (const d of [...expected.blobs, ...expected.manifests]) {
    if (!present.has(d.digest)) bad.push(`missing ${d.mediaType} ${d.digest}`)
  }
  if (bad.length > 0) throw new Error(`OCI layout ${dir} failed verification:\n  ${bad.join('\n  ')}`)
  return { verified: [...present] }
}
