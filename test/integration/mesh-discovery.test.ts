// Discovery beyond multicast, with real daemons on loopback (mDNS off): a node that knows only one peer
// learns the others by peer exchange (signed hellos carry listen addresses, relayed by gossipsub).
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, describe, expect, it } from 'vitest'
import { buildConfig, type RawSettings } from '../../src/config.js'
import { createDaemon, type Daemon } from '../../src/daemon.js'
import { createLogger } from '../../src/logger.js'

const dirs: string[] = []
const nodes: Daemon[] = []

async function node (settings: RawSettings = {}): Promise<Daemon> {
  const dataDir = await mkdtemp(join(tmpdir(), 'pm-disc-'))
  dirs.push(dataDir)
  const d = createDaemon(buildConfig({
    listen: '127.0.0.1:0', dataDir, upstream: ['disc.test=http://127.0.0.1:9'], mdns: false,
    p2pListen: ['/ip4/127.0.0.1/tcp/0'], peerListen: '127.0.0.1:0', ...settings,
  }, {}), { logger: createLogger('silent') })
  await d.start()
  nodes.push(d)
  return d
}

const connectedIds = (d: Daemon): string[] => d.mesh()!.status().peers.filter(p => p.connected).map(p => p.peerId).sort()

async function until (what: string, cond: () => boolean, timeoutMs: number): Promise<number> {
  const t0 = Date.now()
  while (!cond()) {
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out waiting for ${what}`)
    await new Promise(resolve => setTimeout(resolve, 50))
  }
  return Date.now() - t0
}

afterAll(async () => {
  await Promise.allSettled(nodes.splice(0).reverse().map(async n => await n.stop()))
  await Promise.all(dirs.map(async d => await rm(d, { recursive: true, force: true })))
})

describe('peer exchange', () => {
  it('nodes that each know only the first one find each other; --no-peer-exchange neither shares nor uses addresses', async () => {
    // Routing gossip: the DHT also trades addresses, and this measures peer exchange alone.
    const a = await node({ routing: 'gossip' })
    const boot = a.mesh()!.multiaddrs().slice(0, 1)
    const rest = [await node({ bootstrap: boot, routing: 'gossip' }), await node({ bootstrap: boot, routing: 'gossip' }), await node({ bootstrap: boot, routing: 'gossip' })]
    const all = [a, ...rest]
    const ids = all.map(n => n.mesh()!.peerId())
    const ms = await until('every node to be connected to every other', () => all.every((n, i) => connectedIds(n).join() === ids.filter((_, j) => j !== i).sort().join()), 20_000)
    console.log(`peer exchange: 4 nodes that each knew only the first formed a full mesh ${ms} ms after the last one started`)

    // A node that opts out neither announces its addresses nor dials those it hears of: it stays
    // connected to the peer it was told about, and to no one else, well past the time the others took.
    const loner = await node({ bootstrap: boot, peerExchange: false })
    await until('the opted-out node to connect to the first', () => connectedIds(loner).includes(a.mesh()!.peerId()), 10_000)
    await new Promise(resolve => setTimeout(resolve, Math.max(5_000, 3 * ms)))
    expect(connectedIds(loner)).toEqual([a.mesh()!.peerId()])
  }, 60_000)
})
