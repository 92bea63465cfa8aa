// A HEAD on a blob this node lacks asks the upstream's HEAD (no download); when the upstream cannot
// answer, a peer that holds the blob still answers it, as a GET would be.
import { randomBytes } from 'node:crypto'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { buildConfig, type RawSettings } from '../../src/config.js'
import { createDaemon, type Daemon } from '../../src/daemon.js'
import { createLogger } from '../../src/logger.js'
import { parseDigest } from '../../src/oci/digest.js'
import { startFaultUpstream, type FaultUpstream } from '../helpers/fault-upstream.js'
import { simpleRequest } from '../helpers/net.js'

let up: FaultUpstream
const nodes: Daemon[] = []
const dirs: string[] = []

async function node (settings: RawSettings = {}): Promise<Daemon> {
  const dir = await mkdtemp(join(tmpdir(), 'pm-headmesh-'))
  dirs.push(dir)
  const d = createDaemon(buildConfig({
    listen: '127.0.0.1:0', dataDir: dir, upstream: [`mesh.test=${up.url}`], mdns: false,
    p2pListen: ['/ip4/127.0.0.1/tcp/0'], peerListen: '127.0.0.1:0', peerTimeout: '500ms', upstreamRetries: '1', ...settings,
  }, {}), { logger: createLogger('silent') })
  await d.start()
  nodes.push(d)
  return d
}

beforeAll(async () => { up = await startFaultUpstream() })
afterAll(async () => {
  await Promise.allSettled(nodes.reverse().map(async n => await n.stop()))
  await up.close()
  for (const d of dirs) await rm(d, { recursive: true, force: true })
})

describe('HEAD on a miss in a mesh', () => {
  it('is answered from a peer when the upstream is down', async () => {
    const data = randomBytes(300_000)
    const digest = up.addBlob('team/app', data)
    const a = await node()
    expect((await simpleRequest(`${a.url()}/v2/mesh.test/team/app/blobs/${digest}`)).status).toBe(200)
    await expect.poll(async () => await a.store.stat(parseDigest(digest))).toBeDefined()
    const b = await node({ bootstrap: a.mesh()!.multiaddrs().slice(0, 1) })
    await expect.poll(() => b.mesh()!.holders(parseDigest(digest)).length, { timeout: 15_000 }).toBeGreaterThan(0)

    up.setFault({ kind: 'status', status: 503 })
    const head = await simpleRequest(`${b.url()}/v2/mesh.test/team/app/blobs/${digest}`, { method: 'HEAD' })
    expect(head.status).toBe(200)
    expect(head.headers['content-length']).toBe(String(data.length))
    expect(up.requests.filter(r => r.method === 'GET' && r.path.endsWith(digest))).toHaveLength(1) // a's fill only
  })
})
