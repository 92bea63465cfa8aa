import { afterEach, describe, expect, it } from 'vitest'
import { mkdtemp, rm, stat, writeFile, readFile, chmod } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { randomBytes } from 'node:crypto'
import { sha256Of, type Digest } from '../../src/oci/digest.js'
import {
  MAX_GOSSIP_BYTES, MAX_FRAME_BYTES, LineSplitter, FrameTooLargeError, decodeGossip, decodeFrame,
  encodeAdds, encodeRemoves, encodeRemoveAll, encodeTag, encodeHello, frameReq, frameInv, frameBlobs, frameTags, frameEnd,
  frameGone, decodeAnnouncement, stampOrigin, ORIGIN_BYTES,
  type BlobEntry, type TagEntry,
} from '../../src/mesh/messages.js'
import { BLOB_COST, MAX_CLOCK_SKEW_MS, PeerIndex, formatDataUrl } from '../../src/mesh/peer-index.js'
import { RateLimiter, ReplayGuard, TokenBucket, nextEpoch } from '../../src/mesh/announce.js'
import { LocalHoldings } from '../../src/mesh/inventory.js'
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
    const stream = Buffer.concat([frameReq({ epoch: 'e1', gen: 3 }), frameReq(undefined, true), frameInv(5050, 'abc', 7), frameBlobs(blobs), frameTags(tags), frameEnd(2, 1)])
    const sp = new LineSplitter(MAX_FRAME_BYTES)
    const lines: Buffer[] = []
    for (let i = 0; i < stream.length; i += 7) lines.push(...sp.push(stream.subarray(i, i + 7))) // arbitrary chunking
    expect(sp.hasPartial).toBe(false)
    expect(lines.map(l => decodeFrame(l))).toEqual([
      { ok: true, value: { v: 1, t: 'req', epoch: 'e1', gen: 3 } },
      { ok: true, value: { v: 1, t: 'req', delta: true } },
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

describe('gossip origin and inventory deltas (wire)', () => {
  it('every gossip type carries its origin (epoch, seq); a message without one is refused', () => {
    const o = { epoch: 1_767_000_000_123, seq: 42 }
    const t = tag()
    const blobs = [blob(1), blob(2, CONFIG)]
    const msgs = [...encodeAdds(blobs), ...encodeRemoves([dig()]), encodeRemoveAll(), encodeTag(t), encodeHello(5050)]
    for (const m of msgs) {
      const r = decodeAnnouncement(stampOrigin(m, o))
      expect(r).toEqual({ ok: true, value: { origin: o, message: (decodeGossip(m) as { value: unknown }).value } })
      expect(decodeAnnouncement(m)).toEqual({ ok: false, reason: 'origin' })
    }
    // the stamp is appended last, so a body that tries to set its own e/s cannot override it
    const sneaky = stampOrigin(json({ v: 1, t: 'hello', dataPort: 1, e: 9e15, s: 9e15 }), o)
    expect(decodeAnnouncement(sneaky)).toMatchObject({ ok: true, value: { origin: o } })
    expect(decodeAnnouncement(json({ v: 1, t: 'hello', dataPort: 1, e: -1, s: 0 }))).toEqual({ ok: false, reason: 'origin' })
    expect(decodeAnnouncement(json({ v: 1, t: 'hello', dataPort: 1, e: 1, s: 0.5 }))).toEqual({ ok: false, reason: 'origin' })
    expect(stampOrigin(encodeHello(1), o).byteLength - encodeHello(1).byteLength).toBeLessThanOrEqual(ORIGIN_BYTES)
  })

  it('delta frames (gone, end with delta) round-trip', () => {
    const ds = [dig(), dig()]
    const names = [{ upstream: 'docker.io', repo: 'library/alpine', tag: '3.20' }]
    const sp = new LineSplitter(MAX_FRAME_BYTES)
    const lines = sp.push(Buffer.concat([frameGone(ds, names), frameEnd(0, 0, false, { gone: 3 })]))
    expect(lines.map(l => decodeFrame(l))).toEqual([
      { ok: true, value: { v: 1, t: 'gone', blobs: ds, tags: names } },
      { ok: true, value: { v: 1, t: 'end', blobs: 0, tags: 0, same: false, delta: true, gone: 3 } },
    ])
    expect(decodeFrame(json({ v: 1, t: 'gone', d: ['sha256:12'], g: [] }))).toEqual({ ok: false, reason: 'schema' })
  })
})

describe('replay guard', () => {
  it('takes each (epoch, seq) once, tolerates reordering within the window, and a restart', () => {
    const g = new ReplayGuard()
    const e1 = 1_000
    expect(g.accept('a', { epoch: e1, seq: 0 })).toBe(true)
    expect(g.accept('a', { epoch: e1, seq: 0 })).toBe(false) // exact replay
    expect(g.accept('a', { epoch: e1, seq: 5 })).toBe(true)
    expect(g.accept('a', { epoch: e1, seq: 3 })).toBe(true) // late, but not seen before: reordered on the way
    expect(g.accept('a', { epoch: e1, seq: 3 })).toBe(false)
    expect(g.accept('a', { epoch: e1, seq: 100 })).toBe(true)
    expect(g.accept('a', { epoch: e1, seq: 36 })).toBe(false) // before the 64-message window
    expect(g.accept('a', { epoch: e1, seq: 37 })).toBe(true) // just inside it
    // the signer restarts: a newer epoch starts again from seq 0
    expect(g.accept('a', { epoch: e1 + 10, seq: 0 })).toBe(true)
    expect(g.accept('a', { epoch: e1 + 10, seq: 1 })).toBe(true)
    // anything from the old epoch is now a replay, however high its seq
    expect(g.accept('a', { epoch: e1, seq: 101 })).toBe(false)
    expect(g.accept('a', { epoch: e1, seq: 1e9 })).toBe(false)
    // signers are independent
    expect(g.accept('b', { epoch: e1, seq: 0 })).toBe(true)
  })

  it('a restart on the same data dir gets a higher epoch even if the clock went back', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'pullmesh-epoch-'))
    try {
      const first = await nextEpoch(dir, 5_000)
      const second = await nextEpoch(dir, 4_000) // clock stepped back
      const third = await nextEpoch(dir, 9_000)
      expect(first).toBe(5_000)
      expect(second).toBe(5_001)
      expect(third).toBe(9_000)
    } finally {
      await rm(dir, { recursive: true, force: true })
    }
  })
})

describe('gossip rate limits', () => {
  it('token buckets bound messages and bytes per key, refilling over time', () => {
    const l = { messagesPerSec: 10, messagesBurst: 20, bytesPerSec: 1000, bytesBurst: 5000, forwarderFactor: 4 }
    const r = new RateLimiter(l)
    let ok = 0
    for (let i = 0; i < 100; i++) if (r.allow('a', 10, 0)) ok++
    expect(ok).toBe(20) // the burst
    expect(r.allow('b', 10, 0)).toBe(true) // another key has its own bucket
    expect(r.allow('a', 10, 100)).toBe(true) // 100 ms later: one more message
    expect(r.allow('a', 10, 100)).toBe(false)
    // bytes: 5000 burst, then 1000/s
    expect(r.allow('c', 4000, 0)).toBe(true)
    expect(r.allow('c', 2000, 0)).toBe(false)
    expect(r.allow('c', 2000, 1000)).toBe(true)
    // a refused message does not use up a message token
    const f = new RateLimiter(l, l.forwarderFactor)
    let fok = 0
    for (let i = 0; i < 200; i++) if (f.allow('x', 1, 0)) fok++
    expect(fok).toBe(80)
    const b = new TokenBucket(10, 10, 0)
    expect(b.take(10, 0)).toBe(true)
    expect(b.waitFor(1, 0)).toBe(100)
  })
})

describe('local holdings', () => {
  const rec = (d: Digest, verifiedAt: number): { digest: Digest, mediaType: string, size: number, verifiedAt: number, private: boolean } => ({ digest: d, mediaType: 'application/vnd.oci.image.index.v1+json', size: 500, verifiedAt, private: false })

  it('a revalidated tag or a blob added again changes nothing; deltas carry adds, changes and removals', () => {
    const h = new LocalHoldings(3)
    const b1 = blob()
    const d1 = dig()
    expect(h.apply({ type: 'added', info: { ...b1, private: false } as never })).toMatchObject({ type: 'added' })
    expect(h.apply({ type: 'tag', upstream: 'docker.io', repo: 'r', tag: 't', record: rec(d1, 1) })).toMatchObject({ type: 'tag' })
    const g = h.gen
    // the same again: no change, nothing to announce, same generation
    expect(h.apply({ type: 'added', info: { ...b1, private: false } as never })).toBeUndefined()
    expect(h.apply({ type: 'tag', upstream: 'docker.io', repo: 'r', tag: 't', record: rec(d1, 2) })).toBeUndefined()
    expect(h.gen).toBe(g)
    expect(h.changedSince(g)).toEqual({ blobs: [], tags: [], goneBlobs: [], goneTags: [] })
    // private content never enters, and its removal is never announced
    const p = blob()
    expect(h.apply({ type: 'added', info: { ...p, private: true } as never })).toBeUndefined()
    expect(h.apply({ type: 'removed', digest: p.digest })).toBeUndefined()
    // a real change
    const d2 = dig()
    const b2 = blob()
    h.apply({ type: 'tag', upstream: 'docker.io', repo: 'r', tag: 't', record: rec(d2, 3) })
    h.apply({ type: 'added', info: { ...b2, private: false } as never })
    expect(h.apply({ type: 'removed', digest: b1.digest })).toEqual({ type: 'removed', digest: b1.digest })
    const delta = h.changedSince(g)!
    expect(delta.blobs).toEqual([b2])
    expect(delta.tags.map(t => t.record.digest)).toEqual([d2])
    expect(delta.goneBlobs).toEqual([b1.digest])
    expect(h.changedSince(h.gen + 1)).toBeUndefined() // a generation we never had
    // more removals than remembered (3): a requester from before the oldest remembered one gets everything
    for (let i = 0; i < 4; i++) { const x = blob(); h.apply({ type: 'added', info: { ...x, private: false } as never }); h.apply({ type: 'removed', digest: x.digest }) }
    expect(h.changedSince(g)).toBeUndefined()
    expect([...h.listBlobs()]).toEqual([b2])
  })
})

describe('peer index budget', () => {
  const mkIx = (maxIndexBytes: number, extra: Partial<{ maxPeers: number }> = {}): PeerIndex => new PeerIndex({ peerTtlMs: 1_000, entryTtlMs: 60_000, maxIndexBytes, ...extra })
  const peerBlobs = (ix: PeerIndex, id: string): number => ix.status(1).find(p => p.peerId === id)?.blobs ?? 0

  it('bounds total memory; a peer under its fair share evicts the heaviest peer\'s oldest entries, a peer at its share cannot', () => {
    const perBlob = BLOB_COST + dig().length + LAYER.length
    const budget = 100 * perBlob
    const ix = mkIx(budget)
    for (const id of ['hostile', 'real']) { ix.connected(id, '10.0.0.1', [], 0); ix.setDataPort(id, 1, 0) }
    const junk = Array.from({ length: 1_000 }, () => blob())
    ix.addBlobs('hostile', junk, 0)
    expect(peerBlobs(ix, 'hostile')).toBe(100) // free space may be used, but never beyond the budget
    expect(ix.memory().used).toBeLessThanOrEqual(budget)
    const mine = Array.from({ length: 50 }, () => blob())
    ix.addBlobs('real', mine, 1)
    for (const b of mine) expect(ix.holders(b.digest, 2).map(h => h.peerId)).toEqual(['real'])
    expect(peerBlobs(ix, 'hostile')).toBe(50)
    // the hostile peer's oldest entries went first
    expect(ix.holders(junk[0]!.digest, 2)).toEqual([])
    expect(ix.holders(junk[99]!.digest, 2).map(h => h.peerId)).toEqual(['hostile'])
    // at its share, the hostile peer cannot push the real one out
    ix.addBlobs('hostile', Array.from({ length: 100 }, () => blob()), 3)
    expect(peerBlobs(ix, 'real')).toBe(50)
    expect(ix.memory().used).toBeLessThanOrEqual(budget)
    // a disconnected peer's entries are the first to go
    ix.disconnected('hostile', 4)
    ix.connected('third', '10.0.0.3', [], 4)
    ix.addBlobs('third', Array.from({ length: 30 }, () => blob()), 5)
    expect(peerBlobs(ix, 'third')).toBe(30)
    expect(peerBlobs(ix, 'real')).toBe(50)
    expect(peerBlobs(ix, 'hostile')).toBe(20)
    // tags count too
    ix.putTag('third', tag('x'), 6)
    expect(ix.tagRecords('docker.io', 'library/alpine', 'x', 6)).toHaveLength(1)
    expect(ix.memory().used).toBeLessThanOrEqual(budget)
  })

  it('when every peer slot is taken, a newcomer takes the least useful slot instead of being ignored', () => {
    const ix = mkIx(1024 * 1024, { maxPeers: 3 })
    for (const id of ['gone1', 'gone2', 'bad']) { ix.connected(id, '10.0.0.1', [], 0); ix.setDataPort(id, 1, 0); ix.addBlobs(id, [blob()], 0) }
    ix.disconnected('gone1', 1)
    ix.disconnected('gone2', 2)
    const b = blob()
    ix.connected('real', '10.0.0.9', [], 3)
    ix.setDataPort('real', 1, 3)
    ix.addBlobs('real', [b], 3)
    expect(ix.holders(b.digest, 4).map(h => h.peerId)).toEqual(['real'])
    expect(ix.has('gone1')).toBe(false) // disconnected longest
    expect(ix.has('gone2')).toBe(true)
    // all connected now: the lowest score goes
    ix.connected('gone2', '10.0.0.2', [], 5)
    ix.report('bad', 'bad', 5)
    ix.connected('real2', '10.0.0.10', [], 6)
    expect(ix.has('real2')).toBe(true)
    expect(ix.has('bad')).toBe(false)
    expect(ix.status(7)).toHaveLength(3)
  })
})
