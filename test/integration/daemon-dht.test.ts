// Daemons with routing 'dht' on loopback (mDNS off, delegation off): a cold miss that no peer in the
// local index holds asks the DHT, and is served from the provider's data path instead of the upstream;
// a stale provider record (the provider removed the blob) costs a 404 and the upstream serves it.
import { createHash, randomBytes } from 'node:crypto'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import type { Daemon } from '../../src/daemon.js'
import { parseDigest } from '../../src/oci/digest.js'
import type { MeshNode } from '../../src/mesh/index.js'
import { startFaultUpstream, type FaultUpstream } from '../helpers/fault-upstream.js'
import { simpleRequest } from '../helpers/net.js'
import { loopbackMesh, until as untilFor } from '../helpers/loopback-mesh.js'

const sha = (b: Buffer): string => `sha256:${createHash('sha256').update(b).digest('hex')}`
const UP = 'dht.test'

let up: FaultUpstream
const mesh = loopbackMesh({
  upstreamName: UP,
  upstreamUrl: () => up.url,
  dirPrefix: 'pm-dht-',
  settings: { peerTimeout: '2s', routing: 'dht', delegate: false },
})
const { node } = mesh
/** Polls for up to 30 s: provider records travel through the DHT. */
const until = async (what: string, cond: () => boolean | Promise<boolean>): Promise<number> => await untilFor(what, cond, 30_000)

const blobGets = (digest: string): number => up.requests.filter(r => r.method === 'GET' && r.path.endsWith(`/blobs/${digest}`)).length
const getBlob = async (n: Daemon, repo: string, digest: string): Promise<{ status: number, body: Buffer }> =>
  await simpleRequest(`${n.url()}/v2/${UP}/${repo}/blobs/${digest}`, { timeoutMs: 30_000 })

beforeAll(async () => { up = await startFaultUpstream() })
afterAll(async () => {
  await mesh.close()
  await up.close()
})

describe('daemons with routing dht', () => {
  it('a cold miss is served by the holder the DHT names; a stale record costs a 404, then the upstream serves it', async () => {
    const a = await node()
    const b = await node({ bootstrapFrom: [a] })
    const c = await node({ bootstrapFrom: [b] })
    const repo = 'library/app'
    const data = randomBytes(200_000)
    const digest = up.addBlob(repo, data)
    const stale = up.addBlob(repo, randomBytes(50_000))

    for (const d of [digest, stale]) {
      expect((await getBlob(a, repo, d)).status).toBe(200)
      await until(`A has ${d}`, async () => (await a.store.stat(parseDigest(d))) !== undefined)
    }
    expect(blobGets(digest)).toBe(1)
    // No inventory and no per-blob gossip: C's local index never learns who holds it; the DHT does.
    const ms = await until('A\'s provider records are out', async () => {
      const found = await c.mesh()!.findHolders(parseDigest(digest), { deadlineMs: 2_000 })
      const found2 = await c.mesh()!.findHolders(parseDigest(stale), { deadlineMs: 2_000 })
      return found.some(h => h.peerId === a.mesh()!.peerId()) && found2.some(h => h.peerId === a.mesh()!.peerId())
    })
    console.log(`[daemon-dht] provider records found ${ms} ms after the fill`)
    // (found early through A itself, which answers for its own record: wait until the records reached the others)
    await until('A\'s provides completed', () => ((a.mesh() as MeshNode).counters().dhtProvided ?? 0) >= 2)
    expect(c.mesh()!.holders(parseDigest(digest))).toEqual([])

    const r = await getBlob(c, repo, digest)
    expect(r.status).toBe(200)
    expect(sha(r.body)).toBe(digest)
    expect(blobGets(digest)).toBe(1) // from A, not from the upstream

    // A drops the other blob; its record lives on at the nodes that store it until it expires.
    expect(await a.store.delete(parseDigest(stale))).toBe(true)
    expect((await c.mesh()!.findHolders(parseDigest(stale), { deadlineMs: 2_000 })).map(h => h.peerId)).toContain(a.mesh()!.peerId())
    const before = blobGets(stale)
    const s = await getBlob(c, repo, stale)
    expect(s.status).toBe(200)
    expect(sha(s.body)).toBe(stale)
    expect(blobGets(stale)).toBe(before + 1)
  }, 120_000)
})
