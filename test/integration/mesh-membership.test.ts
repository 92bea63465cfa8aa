// Membership on real libp2p nodes over loopback (bootstrap addresses only: never mDNS in the root
// network namespace): mesh connections are tagged, a dropped connection is redialed, and a bootstrap
// peer that restarts (same key, same port) is redialed with backoff until it is back.
import { afterEach, describe, expect, it } from 'vitest'
import { createLibp2p, type Libp2p } from 'libp2p'
import { tcp } from '@libp2p/tcp'
import { noise } from '@chainsafe/libp2p-noise'
import { yamux } from '@chainsafe/libp2p-yamux'
import { identify } from '@libp2p/identify'
import { generateKeyPair } from '@libp2p/crypto/keys'
import type { PrivateKey } from '@libp2p/interface'
import { createLogger } from '../../src/logger.js'
import { createMembership, MESH_TAG, type Membership } from '../../src/mesh/membership.js'

interface TestNode { node: Libp2p, membership: Membership, key: PrivateKey, stop: () => Promise<void> }

const cleanups: Array<() => Promise<void>> = []
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c()
})

async function waitFor (what: string, check: () => boolean | Promise<boolean>, timeoutMs = 15_000): Promise<number> {
  const t0 = Date.now()
  while (!(await check())) {
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out waiting for ${what}`)
    await new Promise(resolve => setTimeout(resolve, 20))
  }
  return Date.now() - t0
}

async function startNode (o: { key?: PrivateKey, port?: number, bootstrap?: string[] } = {}): Promise<TestNode> {
  const key = o.key ?? await generateKeyPair('Ed25519')
  const node = await createLibp2p({
    privateKey: key,
    addresses: { listen: [`/ip4/127.0.0.1/tcp/${o.port ?? 0}`] },
    transports: [tcp()],
    connectionEncrypters: [noise()],
    streamMuxers: [yamux()],
    services: { identify: identify() },
  })
  await node.start()
  const membership = createMembership({ logger: createLogger('silent'), node }, { bootstrap: o.bootstrap ?? [], mdns: false })
  await membership.start()
  let stopped = false
  const stop = async (): Promise<void> => {
    if (stopped) return
    stopped = true
    await membership.stop()
    await node.stop()
  }
  cleanups.push(stop)
  return { node, membership, key, stop }
}

const addrOf = (n: TestNode): string => {
  const a = n.node.getMultiaddrs()[0]
  if (a === undefined) throw new Error('no listen address')
  return a.toString()
}
const portOf = (n: TestNode): number => Number(addrOf(n).split('/')[4])
const linked = (a: TestNode, b: TestNode): boolean => a.node.getConnections(b.node.peerId).length > 0 && b.node.getConnections(a.node.peerId).length > 0

describe('mesh membership (real libp2p on loopback)', () => {
  it('tags mesh connections, and redials both ways after a dropped connection', async () => {
    const a = await startNode()
    const b = await startNode({ bootstrap: [addrOf(a)] })
    await waitFor('bootstrap connection', () => linked(a, b))
    await waitFor('mesh tags on both sides', async () =>
      (await a.node.peerStore.get(b.node.peerId)).tags.get(MESH_TAG)?.value === 100 &&
      (await b.node.peerStore.get(a.node.peerId)).tags.get(MESH_TAG)?.value === 100)

    // A link blip: the connection dies under both nodes. a has no bootstrap address for b: it redials
    // b because it has seen it connected (libp2p itself would never dial it again).
    const bPort = portOf(b)
    // a learns b's listen address from identify (an inbound connection alone shows only an ephemeral port).
    await waitFor('identify', async () => (await a.node.peerStore.get(b.node.peerId)).addresses.some(x => x.multiaddr.toString() === addrOf(b).replace(/\/p2p\/.*$/, '')))
    await b.stop()
    const b2 = await startNode({ key: b.key, port: bPort }) // b comes back without any bootstrap
    const ms = await waitFor('a redials b, which knows nothing of a', () => linked(a, b2))
    console.log(`[membership] a redialed a restarted non-bootstrap peer in ${ms} ms`)
    expect(a.membership.counters().redials).toBeGreaterThanOrEqual(1)

    for (const c of a.node.getConnections(b2.node.peerId)) c.abort(new Error('blip'))
    const ms2 = await waitFor('reconnect after an aborted connection', () => linked(a, b2))
    console.log(`[membership] reconnected ${ms2} ms after an aborted connection`)
  }, 60_000)

  it('redials a bootstrap peer with backoff while it is down, and connects once it is back', async () => {
    const a = await startNode()
    const port = portOf(a)
    const b = await startNode({ bootstrap: [addrOf(a)] })
    await waitFor('bootstrap connection', () => linked(a, b))
    await a.stop()
    await waitFor('b sees a gone', () => b.node.getConnections(a.node.peerId).length === 0)
    const before = b.membership.counters()
    await new Promise(resolve => setTimeout(resolve, 3_000))
    const during = b.membership.counters()
    // ~250 ms, then 0.5, 1, 2 s (±25 %): a handful of attempts, not a busy loop.
    const attempts = during.dials - before.dials
    expect(attempts).toBeGreaterThanOrEqual(2)
    expect(attempts).toBeLessThanOrEqual(6)
    expect(during.dialFailures - before.dialFailures).toBe(attempts)
    const a2 = await startNode({ key: a.key, port })
    const ms = await waitFor('b reconnects to the restarted bootstrap peer', () => linked(a2, b))
    console.log(`[membership] bootstrap peer back after ${attempts} failed attempts in 3 s; reconnected ${ms} ms after it restarted`)
  }, 60_000)
})
