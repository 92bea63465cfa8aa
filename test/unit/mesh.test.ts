import { afterEach, describe, expect, it } from 'vitest'
import { mkdtemp, rm, stat, writeFile, readFile, chmod } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { randomBytes } from 'node:crypto'
import { sha256Of, type Digest } from '../../src/oci/digest.js'
import {
  MAX_GOSSIP_BYTES, MAX_FRAME_BYTES, LineSplitter, FrameTooLargeError, decodeGossip, decodeFrame,
  encodeAdds, encodeRemoves, encodeRemoveAll, encodeTag, encodeHello, frameReq, frameInv, frameBlobs, frameTags, frameEnd,
  type BlobEntry, type TagEntry,
} from '../../src/mesh/messages.js'
import { MAX_CLOCK_SKEW_MS, PeerIndex, formatDataUrl } from '../../src/mesh/peer-index.js'
import { loadOrCreatePeerKey, PeerKeyError } from '../../src/mesh/peer-key.js'
import { generateMeshKey } from '../../src/mesh/mesh.js'

const LAYER = 'application/vnd.oci.image.layer.v1.tar+gzip'
const CONFIG = 'application/vnd.oci.image.config.v1+json'
const dig = (): Digest => sha256Of(randomBytes(8))
const blob = (size = 10, mediaType = LAYER): BlobEntry => ({ digest: dig(), size, mediaType })
const tag = (t = 'latest', verifiedAt = 1000): TagEntry => ({ upstream: 'docker.io', repo: 'library/alpine', tag: t, record: { digest: dig(), mediaType: 'application/vnd.oci.image.index.v1+json', size: 500, verifiedAt } })
const json = (o: unknown): Uint8Array => Buffer.from(JSON.stringify(o))

describe('mesh messages', () => {
  it('round-trips every gossip type', () => {
    const blobs = [blob(1), blob(2, CONFIG), blob(3)]
    const adds = encodeAdds(blobs)
    expect(adds).toHaveLength(1)
    expect(decodeGossip(adds[0]!)).toEqual({ ok: true, value: { v: 1, t: 'add', blobs } })
    const ds = [dig(), dig()]
    expect(decodeGossip(encodeRemoves(ds)[0]!)).toEqual({ ok: true, value: { v: 1, t: 'remove', digests: ds, all: false } })
    expect(decodeGossip(encodeRemoveAll())).toEqual({ ok: true, value: { v: 1, t: 'remove', digests: [], all: true } })
    const t = tag()
    expect(decodeGossip(encodeTag(t))).toEqual({ ok: true, value: { v: 1, t: 'tag', entry: t } })
    expect(decodeGossip(encodeHello(5050))).toEqual({ ok: true, value: { v: 1, t: 'hello', dataPort: 5050 } })
  })

  it('splits 5,000 adds into messages under the size limit', () => {
    const blobs = Array.from({ length: 5_000 }, (_, i) => blob(i * 1000, i % 2 === 0 ? LAYER : CONFIG))
    const msgs = encodeAdds(blobs)
    const total = msgs.reduce((n, m) => n + m.byteLength, 0)
    console.log(`[mesh] encodeAdds(5000): ${msgs.length} messages, ${total} bytes, ${(total / 5000).toFixed(1)} B/blob`)
    const back: BlobEntry[] = []
    for (const m of msgs) {
      expect(m.byteLength).toBeLessThanOrEqual(MAX_GOSSIP_BYTES)
      const r = decodeGossip(m)
      if (!r.ok || r.value.t !== 'add') throw new Error('decode failed')
      back.push(...r.value.blobs)
    }
    expect(back).toEqual(blobs)
  })

  it('rejects oversize, malformed, unversioned and invalid messages', () => {
    const d = dig()
    expect(decodeGossip(new Uint8Array(MAX_GOSSIP_BYTES + 1))).toEqual({ ok: false, reason: 'too-large' })
    expect(decodeGossip(Buffer.from('{'))).toEqual({ ok: false, reason: 'not-json' })
    expect(decodeGossip(json(null))).toEqual({ ok: false, reason: 'schema' })
    expect(decodeGossip(json([1]))).toEqual({ ok: false, reason: 'schema' })
    expect(decodeGossip(json({ t: 'hello', dataPort: 1 }))).toEqual({ ok: false, reason: 'version' })
    expect(decodeGossip(json({ v: 2, t: 'hello', dataPort: 1 }))).toEqual({ ok: false, reason: 'version' })
    const bad = [
      { v: 1, t: 'hello', dataPort: 0 },
      { v: 1, t: 'hello', dataPort: 70000 },
      { v: 1, t: 'add', m: [LAYER], b: [['md5:abc', 1, 0]] },
      { v: 1, t: 'add', m: [LAYER], b: [[d.toUpperCase(), 1, 0]] },
      { v: 1, t: 'add', m: [LAYER], b: [[d, 1.5, 0]] },
      { v: 1, t: 'add', m: [LAYER], b: [[d, 1, 1]] },
      { v: 1, t: 'add', m: ['x'.repeat(300)], b: [[d, 1, 0]] },
      { v: 1, t: 'remove' },
      { v: 1, t: 'remove', d: ['sha256:1234'] },
      { v: 1, t: 'tag', upstream: '', repo: 'r', tag: 't', record: { digest: d, mediaType: 'x', size: 1, verifiedAt: 1 } },
      { v: 1, t: 'tag', upstream: 'u', repo: 'r', tag: 't', record: { digest: d, mediaType: 'x', size: 1 } },
    ]
    for (const m of bad) expect(decodeGossip(json(m))).toEqual({ ok: false, reason: 'schema' })
    // a type this version does not know (a newer peer's) is not malformed: it is ignored without penalty
    expect(decodeGossip(json({ v: 1, t: 'what' }))).toEqual({ ok: false, reason: 'unknown-type' })
  })

  it('inventory frames round-trip and the line splitter bounds lines', () => {
    const blobs = [blob(), blob()]
    const tags = [tag()]
    const stream = Buffer.concat([frameReq({ epoch: 'e1', gen: 3 }), frameInv(5050, 'abc', 7), frameBlobs(blobs), frameTags(tags), frameEnd(2, 1)])
    const sp = new LineSplitter(MAX_FRAME_BYTES)
    const lines: Buffer[] = []
    for (let i = 0; i < stream.length; i += 7) lines.push(...sp.push(stream.subarray(i, i + 7))) // arbitrary chunking
    expect(sp.hasPartial).toBe(false)
    expect(lines.map(l => decodeFrame(l))).toEqual([
      { ok: true, value: { v: 1, t: 'req', epoch: 'e1', gen: 3 } },
      { ok: true, value: { v: 1, t: 'inv', dataPort: 5050, epoch: 'abc', gen: 7 } },
      { ok: true, value: { v: 1, t: 'blobs', blobs } },
      { ok: true, value: { v: 1, t: 'tags', tags } },
      { ok: true, value: { v: 1, t: 'end', blobs: 2, tags: 1, same: false } },
    ])
    const small = new LineSplitter(10)
    expect(() => small.push(Buffer.from('0123456789abc'))).toThrow(FrameTooLargeError)
    expect(decodeFrame(json({ v: 1, t: 'end', blobs: -1, tags: 0 }))).toEqual({ ok: false, reason: 'schema' })
  })

  it('generates pnet key files', () => {
    const a = Buffer.from(generateMeshKey()).toString()
    const b = Buffer.from(generateMeshKey()).toString()
    expect(a).toMatch(/^\/key\/swarm\/psk\/1\.0\.0\/\n\/base16\/\n[0-9a-f]{64}$/)
    expect(a).not.toBe(b)
  })
})

describe('peer index', () => {
  const mk = (): PeerIndex => new PeerIndex({ peerTtlMs: 1_000, entryTtlMs: 10_000 })

  it('lists only reachable holders, best score first, then connected', () => {
    const ix = mk()
    const b = blob()
    for (const [id, host] of [['p1', '10.0.0.1'], ['p2', '10.0.0.2'], ['p3', 'fe80::1']] as const) {
      ix.connected(id, host, [], 0)
      ix.setDataPort(id, 5050, 0)
      ix.addBlobs(id, [b], 0)
    }
    ix.addBlobs('p4', [b], 0) // known only via gossip: no connection, no data URL
    expect(ix.holders(b.digest, 1).map(h => h.peerId).sort()).toEqual(['p1', 'p2', 'p3'])
    expect(ix.holders(b.digest, 1).find(h => h.peerId === 'p3')?.dataUrl).toBe('http://[fe80::1]:5050')
    ix.disconnected('p1', 1)
    ix.report('p2', 'bad', 1)
    expect(ix.holders(b.digest, 2).map(h => h.peerId)).toEqual(['p3', 'p1', 'p2'])
    ix.report('p1', 'good', 2)
    expect(ix.holders(b.digest, 3).map(h => h.peerId)).toEqual(['p1', 'p3', 'p2'])
    // a bad report fades with time (10 min half-life)
    const later = ix.status(3 + 60 * 60_000).find(p => p.peerId === 'p2')!
    expect(later.score).toBeGreaterThan(-0.1)
    expect(formatDataUrl('127.0.0.1', 1)).toBe('http://127.0.0.1:1')
  })

  it('expires entries, and forgets disconnected peers after the TTL', () => {
    const ix = mk()
    const b = blob()
    ix.connected('p1', '10.0.0.1', [], 0)
    ix.setDataPort('p1', 1, 0)
    ix.addBlobs('p1', [b], 0)
    ix.expire(9_999)
    expect(ix.holders(b.digest, 9_999)).toHaveLength(1)
    expect(ix.holders(b.digest, 10_000)).toHaveLength(0) // lookups never return expired entries
    ix.refreshAll('p1', 9_000)
    expect(ix.holders(b.digest, 18_000)).toHaveLength(1)
    ix.disconnected('p1', 18_000)
    ix.expire(18_500)
    expect(ix.has('p1')).toBe(true)
    ix.expire(19_001)
    expect(ix.has('p1')).toBe(false)
    expect(ix.holders(b.digest, 19_001)).toEqual([])
  })

  it('inventory replaces holdings but keeps newer gossip', () => {
    const ix = mk()
    const [old, kept, viaGossip, removedDuring, fresh] = [blob(), blob(), blob(), blob(), blob()]
    ix.connected('p', '10.0.0.9', [], 0)
    ix.setDataPort('p', 1, 0)
    ix.addBlobs('p', [old, kept], 0)
    // inventory requested at t=100; during transfer a new add and a remove arrive by gossip
    ix.addBlobs('p', [viaGossip], 150)
    ix.removeBlobs('p', [removedDuring.digest], 160)
    ix.replaceInventory('p', [kept, removedDuring, fresh], [], 100, 200)
    const has = (b: BlobEntry): boolean => ix.holders(b.digest, 300).length === 1
    expect([old, kept, viaGossip, removedDuring, fresh].map(has)).toEqual([false, true, true, false, true])
    expect(ix.status(300)[0]).toMatchObject({ blobs: 3, bytes: 30 })
    ix.removeAll('p', 400)
    expect(ix.status(400)[0]).toMatchObject({ blobs: 0, bytes: 0 })
    // an inventory requested before a withdrawal is not applied
    ix.replaceInventory('p', [kept], [], 350, 450)
    expect(has(kept)).toBe(false)
  })

  it('tag records: freshest first, never private, bounded per peer', () => {
    const ix = new PeerIndex({ peerTtlMs: 1_000, entryTtlMs: 10_000, maxTagsPerPeer: 2, maxBlobsPerPeer: 2 })
    const t1 = tag('v1', 100)
    const t2 = { ...tag('v1', 300), record: { ...tag('v1', 300).record } }
    ix.putTag('a', t1, 0)
    ix.putTag('b', t2, 0)
    const recs = ix.tagRecords('docker.io', 'library/alpine', 'v1', 1)
    expect(recs.map(r => [r.peerId, r.record.verifiedAt, r.record.private])).toEqual([['b', 300, false], ['a', 100, false]])
    ix.putTag('b', { ...t2, record: { ...t2.record, verifiedAt: 200 } }, 2) // an older confirmation does not win
    expect(ix.tagRecords('docker.io', 'library/alpine', 'v1', 3)[0]!.record.verifiedAt).toBe(300)
    ix.putTag('a', tag('v2'), 0)
    ix.putTag('a', tag('v3'), 0)
    expect(ix.tagRecords('docker.io', 'library/alpine', 'v3', 1)).toEqual([]) // over the per-peer limit
    ix.addBlobs('a', [blob(), blob(), blob()], 0)
    expect(ix.status(1).find(p => p.peerId === 'a')?.blobs).toBe(2)
  })
})

describe('peer key', () => {
  const dirs: string[] = []
  afterEach(async () => { for (const d of dirs.splice(0)) await rm(d, { recursive: true, force: true }) })

  it('is created with mode 0600 and reused', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'pullmesh-key-'))
    dirs.push(dir)
    const sub = join(dir, 'nested', 'data')
    const a = await loadOrCreatePeerKey(sub)
    expect(a.created).toBe(true)
    expect((await stat(join(sub, 'peer-key'))).mode & 0o777).toBe(0o600)
    const b = await loadOrCreatePeerKey(sub)
    expect(b.created).toBe(false)
    expect(b.key.equals(a.key)).toBe(true)
    await chmod(join(sub, 'peer-key'), 0o644)
    await loadOrCreatePeerKey(sub)
    expect((await stat(join(sub, 'peer-key'))).mode & 0o777).toBe(0o600)
  })

  it('refuses a corrupt key instead of silently replacing the identity', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'pullmesh-key-'))
    dirs.push(dir)
    await writeFile(join(dir, 'peer-key'), 'garbage', { mode: 0o600 })
    await expect(loadOrCreatePeerKey(dir)).rejects.toBeInstanceOf(PeerKeyError)
    expect(await readFile(join(dir, 'peer-key'), 'utf8')).toBe('garbage')
  })
  it('caps tag records claiming verification in the future at the allowed clock skew', () => {
    const ix = new PeerIndex({ peerTtlMs: 1_000, entryTtlMs: 10_000 })
    const now = 1_700_000_000_000
    const t = tag('future', 9e15)
    ix.putTag('liar', t, now)
    expect(ix.tagRecords('docker.io', 'library/alpine', 'future', now)[0]!.record.verifiedAt).toBe(now + MAX_CLOCK_SKEW_MS)
  })
})
