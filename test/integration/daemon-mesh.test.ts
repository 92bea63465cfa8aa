// Several daemons on loopback, connected through bootstrap addresses with mDNS off: misses are served
// by peers before the upstream; lying, stalled and killed peers cost time, never correctness; the mesh
// key keeps strangers out; tags survive an upstream outage through the mesh.
import { createHash, randomBytes } from 'node:crypto'
import { mkdtemp, readdir, rm, stat, truncate, open } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest'
import { buildConfig, type RawSettings } from '../../src/config.js'
import { createDaemon, type Daemon } from '../../src/daemon.js'
import { createLogger } from '../../src/logger.js'
import { parseDigest, digestHex } from '../../src/oci/digest.js'
import { MediaType } from '../../src/oci/media-types.js'
import { generateMeshKey } from '../../src/mesh/index.js'
import { AUTH_HEADER, PEER_BLOB_PATH, dataPathKey, signRequest } from '../../src/peer-protocol.js'
import { parseMeshKey } from '../../src/mesh/psk.js'
import { startFaultUpstream, type FaultUpstream } from '../helpers/fault-upstream.js'
import { simpleRequest } from '../helpers/net.js'
import { startDaemon as spawnDaemon, type DaemonProcess } from '../helpers/daemon-process.js'

const sha = (b: Buffer): string => `sha256:${createHash('sha256').update(b).digest('hex')}`
const UP = 'mesh.test'

let up: FaultUpstream
const dirs: string[] = []
const nodes: Daemon[] = []
const procs: DaemonProcess[] = []

async function tempDir (): Promise<string> {
  const d = await mkdtemp(join(tmpdir(), 'pm-mesh-'))
  dirs.push(d)
  return d
}

async function node (settings: RawSettings & { bootstrapFrom?: Daemon[] } = {}): Promise<Daemon> {
  const { bootstrapFrom, ...rest } = settings
  const config = buildConfig({
    listen: '127.0.0.1:0',
    dataDir: await tempDir(),
    upstream: [`${UP}=${up.url}`],
    mdns: false,
    p2pListen: ['/ip4/127.0.0.1/tcp/0'],
    peerListen: '127.0.0.1:0',
    bootstrap: (bootstrapFrom ?? []).flatMap(n => n.mesh()!.multiaddrs().slice(0, 1)),
    peerTimeout: '300ms',
    tagTtl: '0s',
    upstreamRetries: '1',
    upstreamConnectTimeout: '1s',
    upstreamHeadersTimeout: '1s',
    ...rest,
  }, {})
  const d = createDaemon(config, { logger: createLogger('silent') })
  await d.start()
  nodes.push(d)
  return d
}

async function until (what: string, cond: () => boolean | Promise<boolean>, timeoutMs = 15_000): Promise<number> {
  const t0 = Date.now()
  while (!(await cond())) {
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out waiting for ${what}`)
    await new Promise(resolve => setTimeout(resolve, 20))
  }
  return Date.now() - t0
}

const holds = (n: Daemon, d: string): boolean => n.mesh()!.holders(parseDigest(d)).length > 0
const blobGets = (): number => up.requests.filter(r => r.method === 'GET' && r.path.includes('/blobs/')).length
const get = async (n: Daemon, path: string): Promise<{ status: number, body: Buffer, headers: Record<string, unknown> }> =>
  await simpleRequest(n.url() + path, { timeoutMs: 30_000 })
const metric = async (n: Daemon, name: string): Promise<number> => {
  const text = (await simpleRequest(`${n.url()}/metrics`)).body.toString()
  return text.split('\n').filter(l => l.startsWith(name)).reduce((sum, l) => sum + Number(l.split(' ').pop()), 0)
}

/** An image in the fault upstream: a manifest under `tag` naming one config and `layers` random layers. */
function seedImage (repo: string, tag: string, layers: number, layerBytes: number): { manifest: string, blobs: Array<{ digest: string, data: Buffer }> } {
  const blobs = Array.from({ length: layers }, () => { const data = randomBytes(layerBytes); return { digest: up.addBlob(repo, data), data } })
  const cfg = Buffer.from(JSON.stringify({ architecture: 'amd64', os: 'linux', rootfs: { type: 'layers', diff_ids: [] }, n: Math.random() }))
  const cfgD = up.addBlob(repo, cfg)
  const m = {
    schemaVersion: 2,
    mediaType: MediaType.ociManifest,
    config: { mediaType: 'application/vnd.oci.image.config.v1+json', digest: cfgD, size: cfg.length },
    layers: blobs.map(b => ({ mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip', digest: b.digest, size: b.data.length })),
  }
  return { manifest: up.addManifest(repo, tag, Buffer.from(JSON.stringify(m)), MediaType.ociManifest), blobs: [...blobs, { digest: cfgD, data: cfg }] }
}

async function pullAll (n: Daemon, repo: string, tag: string, blobs: Array<{ digest: string, data: Buffer }>): Promise<void> {
  const m = await get(n, `/v2/${UP}/${repo}/manifests/${tag}`)
  expect(m.status).toBe(200)
  for (const b of blobs) {
    const r = await get(n, `/v2/${UP}/${repo}/blobs/${b.digest}`)
    expect(r.status, `blob ${b.digest}`).toBe(200)
    expect(sha(r.body)).toBe(b.digest)
  }
  for (const b of blobs) await cached(n, b.digest)
}

/** A client's response ends once the bytes verify; the store commits (fsync, rename, index) just after. */
async function cached (n: Daemon, digest: string): Promise<void> {
  await until(`${digest} to be committed`, async () => (await n.store.stat(parseDigest(digest))) !== undefined)
}

function blobFile (n: Daemon, digest: string): string {
  const hex = digestHex(parseDigest(digest))
  return join(n.config.dataDir, 'blobs', 'sha256', hex.slice(0, 2), hex)
}

beforeAll(async () => { up = await startFaultUpstream() })
afterEach(async () => {
  for (const p of procs.splice(0)) if (!p.exited()) await p.kill()
  await Promise.allSettled(nodes.splice(0).reverse().map(async n => await n.stop()))
  up.setFault(undefined)
  up.requests.length = 0
})
afterAll(async () => {
  await up.close()
  await Promise.all(dirs.map(async d => await rm(d, { recursive: true, force: true })))
})

describe('peers before the upstream', () => {
  it('B gets every blob from A, with the upstream up and then down; the freshest tag record wins', async () => {
    const a = await node()
    const img = seedImage('library/app', 'v1', 3, 300_000)
    await pullAll(a, 'library/app', 'v1', img.blobs)
    expect(blobGets()).toBe(img.blobs.length)

    const b = await node({ bootstrapFrom: [a] })
    const learned = await until('B to learn A holdings', () => img.blobs.every(x => holds(b, x.digest)))
    console.log(`B learned A's ${img.blobs.length} blobs ${learned} ms after start`)
    up.requests.length = 0
    await pullAll(b, 'library/app', 'v1', img.blobs)
    expect(blobGets()).toBe(0)
    // The upstream stays the authority for tags while it is up.
    expect(up.requests.some(r => r.path.includes('/manifests/v1'))).toBe(true)
    await until('B to count its mesh hits', async () => await metric(b, 'pullmesh_mesh_hits_total{kind="blob"}') === img.blobs.length)

    // Upstream down: a fresh node C resolves the tag from the mesh and the blobs from peers.
    const c = await node({ bootstrapFrom: [a] })
    await until('C to learn holdings', () => img.blobs.every(x => holds(c, x.digest)))
    await until('C to learn the tag record', () => c.mesh()!.tagRecords(UP, 'library/app', 'v1').length > 0)
    up.setFault({ kind: 'status', status: 503 })
    up.requests.length = 0
    await pullAll(c, 'library/app', 'v1', img.blobs)
    expect((await get(c, `/v2/${UP}/library/app/manifests/${img.manifest}`)).status).toBe(200)
    expect(blobGets()).toBe(0)
    expect(await metric(c, 'pullmesh_stale_tags_served_total')).toBeGreaterThan(0)
  })

  it('range requests work through peers', async () => {
    const a = await node()
    const data = randomBytes(3 * 1024 * 1024)
    const d = up.addBlob('library/ranged', data)
    expect(sha((await get(a, `/v2/${UP}/library/ranged/blobs/${d}`)).body)).toBe(d)
    const b = await node({ bootstrapFrom: [a] })
    await until('B to learn A holds the blob', () => holds(b, d))
    up.requests.length = 0
    const r = await simpleRequest(`${b.url()}/v2/${UP}/library/ranged/blobs/${d}`, { headers: { range: 'bytes=1048570-1048599' } })
    expect(r.status).toBe(206)
    expect(r.headers['content-range']).toBe(`bytes 1048570-1048599/${data.length}`)
    expect(r.body.equals(data.subarray(1048570, 1048600))).toBe(true)
    // The peer's data path answers ranges too.
    const direct = await simpleRequest(a.peerUrl()! + PEER_BLOB_PATH + d, { headers: { range: 'bytes=-10' } })
    expect(direct.status).toBe(206)
    expect(direct.body.equals(data.subarray(data.length - 10))).toBe(true)
    expect(blobGets()).toBe(0)
  })

  it('takes nothing from a peer that offers more than the disk budget', async () => {
    const a = await node()
    const data = randomBytes(3 * 1024 * 1024)
    const d = up.addBlob('library/huge', data)
    expect(sha((await get(a, `/v2/${UP}/library/huge/blobs/${d}`)).body)).toBe(d)
    const b = await node({ bootstrapFrom: [a], maxSize: '2MiB' })
    await until('B to learn A holds the blob', () => holds(b, d))
    up.requests.length = 0
    const r = await get(b, `/v2/${UP}/library/huge/blobs/${d}`)
    expect(sha(r.body)).toBe(d)
    expect(blobGets()).toBe(1)
    expect(await metric(b, 'pullmesh_mesh_peer_bytes_total{direction="in"}')).toBe(0)
    expect(await metric(b, 'pullmesh_mesh_peer_errors_total')).toBeGreaterThan(0)
  })

  it('a mesh tag record never overrides a fresher upstream answer', async () => {
    const a = await node()
    seedImage('library/moving', 'latest', 1, 1000)
    expect((await get(a, `/v2/${UP}/library/moving/manifests/latest`)).status).toBe(200)
    const b = await node({ bootstrapFrom: [a] })
    await until('B to learn the tag record', () => b.mesh()!.tagRecords(UP, 'library/moving', 'latest').length > 0)
    const moved = seedImage('library/moving', 'latest', 1, 1000)
    const r = await get(b, `/v2/${UP}/library/moving/manifests/latest`)
    expect(r.headers['docker-content-digest']).toBe(moved.manifest)
  })

  it('a lying peer costs a retry, never a wrong byte, and is deprioritised', async () => {
    const a = await node()
    const data = randomBytes(2 * 1024 * 1024)
    const d = up.addBlob('library/app', data)
    expect(sha((await get(a, `/v2/${UP}/library/app/blobs/${d}`)).body)).toBe(d)
    await cached(a, d)
    // A's copy rots on disk (same size): its data path now serves wrong bytes.
    const fh = await open(blobFile(a, d), 'r+')
    await fh.write(Buffer.from([0x00, 0xff, 0x00]), 0, 3, 1000)
    await fh.close()
    const b = await node({ bootstrapFrom: [a] })
    await until('B to learn A holds the blob', () => holds(b, d))
    up.requests.length = 0
    const r = await get(b, `/v2/${UP}/library/app/blobs/${d}`)
    expect(r.status).toBe(200)
    expect(sha(r.body)).toBe(d)
    expect(blobGets()).toBe(1)
    expect(await metric(b, 'pullmesh_mesh_peer_errors_total')).toBeGreaterThan(0)
    const score = b.mesh()!.status().peers.find(p => p.peerId === a.mesh()!.status().peerId)?.score ?? 0
    expect(score).toBeLessThan(0)
  })

  it('a peer whose copy was damaged on disk does not serve it, and the upstream completes the request', async () => {
    const a = await node()
    const data = randomBytes(4 * 1024 * 1024)
    const d = up.addBlob('library/app', data)
    await get(a, `/v2/${UP}/library/app/blobs/${d}`)
    await cached(a, d)
    await truncate(blobFile(a, d), 1024 * 1024)
    const b = await node({ bootstrapFrom: [a] })
    await until('B to learn A holds the blob', () => holds(b, d))
    const r = await get(b, `/v2/${UP}/library/app/blobs/${d}`)
    expect(sha(r.body)).toBe(d)
  })

  it('a stalled peer costs at most the peer timeout; a peer killed mid-transfer falls back too', async () => {
    const aDir = await tempDir()
    const a = await spawnDaemon({ dataDir: aDir, upstreams: { [UP]: up.url }, mesh: true, logLevel: 'info' })
    procs.push(a)
    const started = a.logs().map(l => { try { return JSON.parse(l) as { msg?: string, p2p?: string[] } } catch { return {} } }).find(l => l.msg === 'mesh started' && Array.isArray(l.p2p))
    expect(started?.p2p?.[0]).toMatch(/\/p2p\//)
    const big = randomBytes(192 * 1024 * 1024)
    const bigD = up.addBlob('library/big', big)
    const small = randomBytes(64 * 1024)
    const smallD = up.addBlob('library/big', small)
    for (const dg of [bigD, smallD]) expect((await simpleRequest(`${a.url}/v2/${UP}/library/big/blobs/${dg}`, { timeoutMs: 60_000 })).status).toBe(200)

    const b = await node({ bootstrap: [started!.p2p![0]!] })
    await until('B to learn A holdings', () => holds(b, bigD) && holds(b, smallD))

    // Stalled: A is frozen; B's connect succeeds (the kernel accepts) but no headers come.
    process.kill(a.pid, 'SIGSTOP')
    try {
      const t0 = Date.now()
      const r = await get(b, `/v2/${UP}/library/big/blobs/${smallD}`)
      console.log(`stalled peer: served from upstream after ${Date.now() - t0} ms (peer timeout 300 ms)`)
      expect(sha(r.body)).toBe(smallD)
    } finally {
      process.kill(a.pid, 'SIGCONT')
    }

    // Killed mid-transfer: freeze A as soon as B starts writing its bytes, then kill it.
    up.requests.length = 0
    const pending = get(b, `/v2/${UP}/library/big/blobs/${bigD}`)
    const tmp = join(b.config.dataDir, 'tmp')
    await until('B to start receiving from A', async () => {
      for (const f of await readdir(tmp).catch(() => [])) if ((await stat(join(tmp, f)).catch(() => undefined))?.size ?? 0 > 0) return true
      return false
    }, 20_000)
    process.kill(a.pid, 'SIGSTOP')
    const partial = (await readdir(tmp)).length
    await a.kill()
    const r = await pending
    expect(r.status).toBe(200)
    expect(sha(r.body)).toBe(bigD)
    expect(partial).toBeGreaterThan(0)
    expect(blobGets()).toBe(1)
    expect(await metric(b, 'pullmesh_mesh_peer_errors_total')).toBeGreaterThan(0)
  })

  it('a node that starts late learns the holdings of the peers it connects to within seconds', async () => {
    const a = await node()
    const img = seedImage('library/late', 'v1', 20, 1000)
    await pullAll(a, 'library/late', 'v1', img.blobs)
    const t0 = Date.now()
    const late = await node({ bootstrapFrom: [a] })
    await until('the late node to learn every blob', () => img.blobs.every(x => holds(late, x.digest)), 10_000)
    console.log(`late joiner: knew all ${img.blobs.length} of a peer's blobs ${Date.now() - t0} ms after its start began`)
    const st = late.mesh()!.status()
    expect(st.peers[0]?.blobs).toBeGreaterThanOrEqual(img.blobs.length)
  })
})

describe('private mesh and private content', () => {
  it('a node with the wrong mesh key can neither join nor read blobs', async () => {
    const dir = await tempDir()
    const { writeFile } = await import('node:fs/promises')
    const k1 = join(dir, 'k1')
    const k2 = join(dir, 'k2')
    await writeFile(k1, generateMeshKey())
    await writeFile(k2, generateMeshKey())
    const a = await node({ meshKey: k1 })
    const data = randomBytes(10_000)
    const d = up.addBlob('library/app', data)
    await get(a, `/v2/${UP}/library/app/blobs/${d}`)
    const b = await node({ meshKey: k1, bootstrapFrom: [a] })
    const c = await node({ meshKey: k2, bootstrapFrom: [a] })
    await until('B to join', () => holds(b, d))
    await new Promise(resolve => setTimeout(resolve, 1500))
    expect(holds(c, d)).toBe(false)
    expect(c.mesh()!.status().peers.filter(p => p.connected)).toEqual([])

    const { readFile } = await import('node:fs/promises')
    const path = PEER_BLOB_PATH + d
    const as = a.peerUrl()!
    expect((await simpleRequest(as + path)).status).toBe(401)
    const target = a.mesh()!.status().peerId
    const wrong = dataPathKey(parseMeshKey(await readFile(k2)))
    expect((await simpleRequest(as + path, { headers: { [AUTH_HEADER]: signRequest(wrong, { target, method: 'GET', url: path }) } })).status).toBe(401)
    const right = dataPathKey(parseMeshKey(await readFile(k1)))
    const ok = await simpleRequest(as + path, { headers: { [AUTH_HEADER]: signRequest(right, { target, method: 'GET', url: path }) } })
    expect(ok.status).toBe(200)
    expect(sha(ok.body)).toBe(d)
    // An old signature (replayed after the window) is refused.
    expect((await simpleRequest(as + path, { headers: { [AUTH_HEADER]: signRequest(right, { target, method: 'GET', url: path }, Date.now() - 120_000) } })).status).toBe(401)
  })

  it('content pulled with credentials is neither announced nor served to peers', async () => {
    const authed = await startFaultUpstream({ auth: { username: 'u', password: 'p' } })
    try {
      const dir = await tempDir()
      const { writeFile } = await import('node:fs/promises')
      const creds = join(dir, 'creds.json')
      await writeFile(creds, JSON.stringify({ 'private.test': { username: 'u', password: 'p' } }))
      const a = await node({ upstream: [`${UP}=${up.url}`, `private.test=${authed.url}`], credentialsFile: creds })
      const secret = authed.addBlob('team/secret', randomBytes(5000))
      const pub = up.addBlob('library/app', randomBytes(5000))
      expect((await get(a, `/v2/private.test/team/secret/blobs/${secret}`)).status).toBe(200)
      expect((await get(a, `/v2/${UP}/library/app/blobs/${pub}`)).status).toBe(200)
      const b = await node({ bootstrapFrom: [a] })
      await until('B to learn the public blob', () => holds(b, pub))
      expect(holds(b, secret)).toBe(false)
      expect((await simpleRequest(a.peerUrl()! + PEER_BLOB_PATH + secret)).status).toBe(404)
      expect((await simpleRequest(a.peerUrl()! + PEER_BLOB_PATH + pub)).status).toBe(200)
    } finally {
      await authed.close()
    }
  })

  it('the data path serves only by digest, never forwards, and refuses bad input', async () => {
    const a = await node()
    const base = a.peerUrl()!
    const missing = `sha256:${'2'.repeat(64)}`
    expect((await simpleRequest(base + PEER_BLOB_PATH + missing)).status).toBe(404)
    expect(up.requests.length).toBe(0)
    for (const p of [`${PEER_BLOB_PATH}sha256:abc`, `${PEER_BLOB_PATH}..%2f..%2fetc%2fpasswd`, '/v2/mesh.test/library/app/manifests/latest', '/pullmesh/v1/status']) {
      const r = await simpleRequest(base + p)
      expect(r.status, p).toBeGreaterThanOrEqual(400)
      expect(r.status, p).toBeLessThan(500)
    }
    expect(up.requests.length).toBe(0)
  })
})
