// Daemons with routing 'dht' on loopback (mDNS off, delegation off): a cold miss that no peer in the
// local index holds asks the DHT, and is served from the provider's data path instead of the upstream;
// a stale provider record (the provider removed the blob) costs a 404 and the upstream serves it.
import { createHash, randomBytes } from 'node:crypto'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { buildConfig, type RawSettings } from '../../src/config.js'
import { createDaemon, type Daemon } from '../../src/daemon.js'
import { createLogger } from '../../src/logger.js'
import { parseDigest } from '../../src/oci/digest.js'
import type { MeshNode } from '../../src/mesh/index.js'
import { startFaultUpstream, type FaultUpstream } from '../helpers/fault-upstream.js'
import { simpleRequest } from '../helpers/net.js'

const sha = (b: Buffer): string => `sha256:${createHash('sha256').update(b).digest('hex')}`
const UP = 'dht.test'

let up: FaultUpstream
const dirs: string[] = []
const nodes: Daemon[] = []

async function node (settings: RawSettings & { bootstrapFrom?: Daemon[] } = {}): Promise<Daemon> {
  const { bootstrapFrom, ...rest } = settings
  const dataDir = await mkdtemp(join(tmpdir(), 'pm-dht-'))
  dirs.push(dataDir)
  const config = buildConfig({
    listen: '127.0.0.1:0',
    dataDir,
    upstream: [`${UP}=${up.url}`],
    mdns: false,
    p2pListen: ['/ip4/127.0.0.1/tcp/0'],
    peerListen: '127.0.0.1:0',
    bootstrap: (bootstrapFrom ?? []).flatMap(n => n.mesh()!.multiaddrs().slice(0, 1)),
    peerTimeout: '2s',
    upstreamRetries: '1',
    routing: 'dht',
    delegate: false,
    ...rest,
  }, {})
  const d = createDaemon(config, { logger: createLogger('silent') })
  nodes.push(d)
  await d.start()
  return d
}

async function until (what: string, cond: () => boolean | Promise<boolean>, timeoutMs = 30_000): Promise<number> {
  const t0 = Date.now()
  while (!(await cond())) {
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out waiting for ${what}`)
    await new Promise(resolve => setTimeout(resolve, 50))
  }
  return Date.now() - t0
}

const blobGets = (digest: string): number => up.requests.filter(r => r.method === 'GET' && r.path.endsWith(`/blobs/${digest}`)).length
const getBlob = async (n: Daemon, repo: string, digest: string): Promise<{ status: number, body: Buffer }> =>
  await simpleRequest(`${n.url()}/v2/${UP}/${repo}/blobs/${digest}`, { timeoutMs: 30_000 })

beforeAll(async () => { up = await startFaultUpstream() })
afterAll(async () => {
  await Promise.allSettled(nodes.splice(0).reverse().map(async n => await n.stop()))
  await up.close()
  await Promise.all(dirs.map(async d => await rm(d, { recursive: true, force: true })))
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
