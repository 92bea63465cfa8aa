// Several daemons on loopback, connected through bootstrap addresses with mDNS off: misses are served
// by peers before the upstream; lying, stalled and killed peers cost time, never correctness; the mesh
// key keeps strangers out; tags survive an upstream outage through the mesh.
import { createHash, randomBytes } from 'node:crypto'
import { readdir, stat, truncate, open } from 'node:fs/promises'
import { join } from 'node:path'
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest'
import type { RawSettings } from '../../src/config.js'
import type { Daemon } from '../../src/daemon.js'
import { createLogger } from '../../src/logger.js'
import { parseDigest, digestHex } from '../../src/oci/digest.js'
import { MediaType } from '../../src/oci/media-types.js'
import { generateMeshKey } from '../../src/mesh/index.js'
import { AUTH_HEADER, PEER_BLOB_PATH, dataPathKey, signRequest } from '../../src/peer-protocol.js'
import { parseMeshKey } from '../../src/mesh/psk.js'
import { startFaultUpstream, type FaultUpstream } from '../helpers/fault-upstream.js'
import { simpleRequest } from '../helpers/net.js'
import { startDaemon as spawnDaemon, type DaemonProcess } from '../helpers/daemon-process.js'
import { loopbackMesh, until } from '../helpers/loopback-mesh.js'

const sha = (b: Buffer): string => `sha256:${createHash('sha256').update(b).digest('hex')}`
const UP = 'mesh.test'

let up: FaultUpstream
const procs: DaemonProcess[] = []
const mesh = loopbackMesh({
  upstreamName: UP,
  upstreamUrl: () => up.url,
  dirPrefix: 'pm-mesh-',
  settings: { peerTimeout: '300ms', tagTtl: '0s', upstreamConnectTimeout: '1s', upstreamHeadersTimeout: '1s' },
})
const { node, tempDir } = mesh

const holds = (n: Daemon, d: string): boolean => n.mesh()!.holders(parseDigest(d)).length > 0
const blobGets = (): number => up.requests.filter(r => r.method === 'GET' && r.path.includes('/blobs/')).length
const get = async (n: Daemon, path: string): Promise<{ status: number, body: Buffer, headers: Record<string, unknown> }> =>
  await simpleRequest(n.url() + path, { timeoutMs: 30_000 })
/** A GET that reports an aborted body instead of throwing. */
async function fetchBody (n: Daemon, path: string): Promise<{ status: number, body: Buffer, aborted: boolean }> {
  const { request } = await import('undici')
  const res = await request(n.url() + path)
  const chunks: Buffer[] = []
  try {
    for await (const c of res.body) chunks.push(c as Buffer)
    return { status: res.statusCode, body: Buffer.concat(chunks), aborted: false }
  } catch {
    return { status: res.statusCode, body: Buffer.concat(chunks), aborted: true }
  }
}
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
  await mesh.stopNodes()
  up.setFault(undefined)
  up.requests.length = 0
})
afterAll(async () => {
  await up.close()
  await mesh.close()
})

describe('peers before the upstream', () => {
  it('B gets every blob from A, with the upstream up and then down; a node with no record of its own takes the freshest peer record', async () => {
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
    // B streams from A as the bytes arrive; they fail verification, so the response that carried them
    // is aborted (never completed), and the fill moves on to the upstream for everyone else.
    const first = await fetchBody(b, `/v2/${UP}/library/app/blobs/${d}`)
    // Whatever the first response got, it never completes with a wrong byte (a reader that had sent
    // nothing yet when the peer failed carries on with the upstream's bytes).
    if (!first.aborted) expect(sha(first.body)).toBe(d)
    // The client's retry gets the right bytes.
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

// ---- one upstream fetch per mesh ------------------------------------------------------------

/** N nodes, each bootstrapped from every earlier one, so that every pair is connected. */
async function fullMesh (n: number, settings: RawSettings = {}): Promise<Daemon[]> {
  const out: Daemon[] = []
  for (let i = 0; i < n; i++) out.push(await node({ ...settings, bootstrapFrom: [...out] }))
  // Everyone knows everyone as a member that fetches from the shared upstream.
  await until('every node to see every other as a mesh member', () => out.every(x => x.mesh()!.members().filter(m => m.upstreams.length > 0).length === n - 1), 20_000)
  return out
}

const getsOf = (pathPart: string, method = 'GET'): number => up.requests.filter(r => r.method === method && r.path.includes(pathPart)).length

async function meshKeyFile (): Promise<string> {
  const { writeFile } = await import('node:fs/promises')
  const f = join(await tempDir(), 'mesh.key')
  await writeFile(f, generateMeshKey())
  return f
}

describe('one upstream fetch per mesh', () => {
  it('4 nodes pulling the same cold image at once fetch each blob and the tag once (keyed mesh)', async () => {
    const key = await meshKeyFile()
    // (A peer timeout of 1 s: a loaded CI machine running four nodes in one process must not turn a
    // slow answer into a fallback to the upstream, which this test would count as a second fetch.)
    const ns = await fullMesh(4, { meshKey: key, tagTtl: '5m', peerTimeout: '1s' })
    const img = seedImage('library/herd', 'v1', 4, 2 * 1024 * 1024)
    up.requests.length = 0
    await Promise.all(ns.map(async n => await pullAll(n, 'library/herd', 'v1', img.blobs)))
    for (const b of img.blobs) expect(getsOf(`/blobs/${b.digest}`), `upstream GETs of ${b.digest}`).toBe(1)
    expect(getsOf('/manifests/v1'), 'upstream GETs of the tag').toBe(1)
    let delegated = 0
    let forPeers = 0
    for (const n of ns) {
      delegated += await metric(n, 'pullmesh_mesh_delegated_fetches_total')
      forPeers += await metric(n, 'pullmesh_mesh_fetches_for_peers_total')
    }
    expect(delegated).toBeGreaterThan(0)
    expect(forPeers).toBeGreaterThan(0)
    // Bytes that came over the mesh are counted as such.
    let peerBytes = 0
    for (const n of ns) peerBytes += await metric(n, 'pullmesh_bytes_served_total{source="peer"}')
    expect(peerBytes).toBeGreaterThan(0)
  })

  it('staggered starts (300 ms and 1 s apart) still fetch each blob once; an open mesh resolves tags per node', async () => {
    for (const gap of [300, 1000]) {
      const ns = await fullMesh(3, { peerTimeout: '1s' })
      const img = seedImage(`library/stagger${gap}`, 'v1', 3, 4 * 1024 * 1024)
      // A slow upstream keeps the fills running while the later nodes arrive.
      up.setFault({ kind: 'slow', chunkBytes: 256 * 1024, delayMs: 60 }, { path: /\/blobs\// })
      up.requests.length = 0
      await Promise.all(ns.map(async (n, i) => {
        await new Promise(resolve => setTimeout(resolve, i * gap))
        await pullAll(n, `library/stagger${gap}`, 'v1', img.blobs)
      }))
      up.setFault(undefined)
      for (const b of img.blobs) expect(getsOf(`/blobs/${b.digest}`), `gap ${gap}: upstream GETs of ${b.digest}`).toBe(1)
      // Without a mesh key no peer may tell a node what a tag means while the upstream is up.
      expect(getsOf(`/library/stagger${gap}/manifests/v1`)).toBe(3)
      await mesh.stopNodes()
    }
  })

  it('a fetcher killed mid-fill: every pull completes with verified bytes', async () => {
    const aDir = await tempDir()
    const a = await spawnDaemon({ dataDir: aDir, upstreams: { [UP]: up.url }, mesh: true, logLevel: 'info' })
    procs.push(a)
    const started = a.logs().map(l => { try { return JSON.parse(l) as { msg?: string, p2p?: string[], peer?: string } } catch { return {} } }).find(l => l.msg === 'mesh started' && Array.isArray(l.p2p))
    const aId = started!.p2p![0]!.split('/p2p/')[1]!
    const b = await node({ bootstrap: [started!.p2p![0]!] })
    await until('B to see A as a member', () => b.mesh()!.members().some(m => m.peerId === aId && m.upstreams.length > 0))
    // A blob that A is chosen to fetch (rendezvous over A and B).
    const { rendezvous, upstreamId } = await import('../../src/content/delegation.js')
    const uid = upstreamId(up.url)
    let data: Buffer
    let d: string
    do {
      data = randomBytes(24 * 1024 * 1024)
      d = sha(data)
    } while (rendezvous(`${uid}\nblob:${d}`, [aId, b.mesh()!.peerId()]) !== aId)
    up.addBlob('library/kill', data)
    up.setFault({ kind: 'slow', chunkBytes: 512 * 1024, delayMs: 40 }, { path: /\/blobs\//, times: 1 })
    up.requests.length = 0
    const pending = fetchBody(b, `/v2/${UP}/library/kill/blobs/${d}`)
    // Kill A once B has started receiving its bytes.
    await until('B to stream from A', async () => await metric(b, 'pullmesh_mesh_peer_bytes_total{direction="in"}') > 1024 * 1024, 20_000)
    process.kill(a.pid, 'SIGKILL')
    const r = await pending
    expect(r.aborted).toBe(false)
    expect(sha(r.body)).toBe(d)
    // B continued where A stopped: the upstream's second request was a range for the rest.
    const gets = up.requests.filter(x => x.method === 'GET' && x.path.includes(`/blobs/${d}`))
    expect(gets.length).toBe(2)
    expect(String(gets[1]!.headers.range ?? '')).toMatch(/^bytes=\d+-\d+$/)
    await cached(b, d)
  })

  it('a trickling peer loses the fill within the rate window; the pull completes from the upstream', async () => {
    const { createServer } = await import('node:http')
    const { createFsStore } = await import('../../src/store/fs-store.js')
    const { createMesh } = await import('../../src/mesh/index.js')
    const { createMetrics } = await import('../../src/metrics.js')
    const data = randomBytes(1024 * 1024)
    const d = up.addBlob('library/trickle', data)
    // The hostile peer: a real mesh node whose store really holds the blob (so it announces it), but
    // whose data path is this server, which sends one byte every 100 ms.
    const timers = new Set<NodeJS.Timeout>()
    const trickle = createServer((req, res) => {
      res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': String(data.length) })
      let i = 0
      const t = setInterval(() => { if (i < data.length) res.write(data.subarray(i, ++i)) }, 100)
      timers.add(t)
      res.once('close', () => { clearInterval(t); timers.delete(t) })
    })
    await new Promise<void>(resolve => trickle.listen(0, '127.0.0.1', resolve))
    const logger = createLogger('silent')
    const metrics = createMetrics()
    const store = createFsStore({ logger, metrics }, { dataDir: await tempDir() })
    await store.start()
    await store.putBuffer(parseDigest(d), data, { mediaType: 'application/octet-stream' })
    const hostile = createMesh({ logger, metrics, store }, { dataDir: await tempDir(), listen: ['/ip4/127.0.0.1/tcp/0'], bootstrap: [], mdns: false, dataPort: (trickle.address() as { port: number }).port })
    await hostile.start()
    try {
      const b = await node({ bootstrap: [hostile.multiaddrs()[0]!], peerMinRate: '256KiB', peerRateWindow: '1s' })
      await until('B to learn the hostile peer holds the blob', () => holds(b, d))
      up.requests.length = 0
      const t0 = Date.now()
      const r = await fetchBody(b, `/v2/${UP}/library/trickle/blobs/${d}`)
      const ms = Date.now() - t0
      console.log(`trickling peer: the pull completed after ${ms} ms (rate window 1 s)`)
      expect(sha(r.body)).toBe(d)
      expect(ms).toBeLessThan(10_000)
      expect(await metric(b, 'pullmesh_mesh_peer_errors_total{reason="too-slow"}')).toBe(1)
      expect(b.mesh()!.status().peers.find(p => p.peerId === hostile.peerId())?.score ?? 0).toBeLessThan(0)
    } finally {
      await hostile.stop()
      await store.stop()
      for (const t of timers) clearInterval(t)
      trickle.closeAllConnections()
      await new Promise(resolve => trickle.close(resolve))
    }
  })

  it('a peer that announced a digest and then answers 404 is penalised, and no longer offered as a holder once it keeps doing so', async () => {
    const { createServer } = await import('node:http')
    const { createFsStore } = await import('../../src/store/fs-store.js')
    const { createMesh } = await import('../../src/mesh/index.js')
    const { createMetrics } = await import('../../src/metrics.js')
    const blobs = [randomBytes(100_000), randomBytes(100_000), randomBytes(100_000), randomBytes(100_000)]
    const digests = blobs.map(b => up.addBlob('library/liar404', b))
    // A real mesh node whose store holds the blobs (so it announces them), with a data path that has none.
    const liarData = createServer((_req, res) => { res.writeHead(404, { 'content-type': 'application/json' }); res.end('{"errors":[{"code":"BLOB_UNKNOWN","message":"no"}]}') })
    await new Promise<void>(resolve => liarData.listen(0, '127.0.0.1', resolve))
    const logger = createLogger('silent')
    const metrics = createMetrics()
    const store = createFsStore({ logger, metrics }, { dataDir: await tempDir() })
    await store.start()
    for (let i = 0; i < blobs.length; i++) await store.putBuffer(parseDigest(digests[i]!), blobs[i]!, { mediaType: 'application/octet-stream' })
    const liar = createMesh({ logger, metrics, store }, { dataDir: await tempDir(), listen: ['/ip4/127.0.0.1/tcp/0'], bootstrap: [], mdns: false, dataPort: (liarData.address() as { port: number }).port })
    await liar.start()
    try {
      const b = await node({ bootstrap: [liar.multiaddrs()[0]!] })
      await until('B to learn what the liar announced', () => digests.every(d => holds(b, d)))
      const score = (): number => b.mesh()!.status().peers.find(p => p.peerId === liar.peerId())?.score ?? 0
      up.requests.length = 0
      for (const d of digests.slice(0, 2)) expect(sha((await get(b, `/v2/${UP}/library/liar404/blobs/${d}`)).body)).toBe(d)
      expect(score()).toBeLessThan(0)
      expect(await metric(b, 'pullmesh_mesh_peer_errors_total{reason="missing"}')).toBe(2)
      // Penalised on each 404 and then, far enough down, no longer offered as a holder at all.
      for (const d of digests.slice(2)) expect(sha((await get(b, `/v2/${UP}/library/liar404/blobs/${d}`)).body)).toBe(d)
      expect(b.mesh()!.holders(parseDigest(digests[3]!))).toEqual([])
      expect(blobGets()).toBe(4)
    } finally {
      await liar.stop()
      await store.stop()
      liarData.closeAllConnections()
      await new Promise(resolve => liarData.close(resolve))
    }
  })

  it('a fetcher takes at most 16 delegated fetches from one peer at once; more are refused at once (429)', async () => {
    const { upstreamId, PEER_FETCH_PATH } = await import('../../src/content/delegation.js')
    const { request } = await import('undici')
    const a = await node({ upstreamHeadersTimeout: '30s' })
    const digests = Array.from({ length: 17 }, () => up.addBlob('library/many', randomBytes(1000)))
    up.setFault({ kind: 'hang' }, { path: /\/blobs\// })
    const ac = new AbortController()
    const url = (d: string): string => `${a.peerUrl()!}${PEER_FETCH_PATH}blob/${d}?u=${upstreamId(up.url)}&r=library/many`
    try {
      const held = await Promise.all(digests.slice(0, 16).map(async d => await request(url(d), { signal: ac.signal })))
      expect(held.map(r => r.statusCode)).toEqual(Array(16).fill(200))
      const refused = await simpleRequest(url(digests[16]!))
      expect(refused.status).toBe(429)
      for (const r of held) r.body.on('error', () => {})
    } finally {
      ac.abort()
    }
  })

  it('content pulled with credentials is never delegated', async () => {
    const authed = await startFaultUpstream({ auth: { username: 'u', password: 'p' } })
    try {
      const { writeFile } = await import('node:fs/promises')
      const creds = join(await tempDir(), 'creds.json')
      await writeFile(creds, JSON.stringify({ 'private.test': { username: 'u', password: 'p' } }))
      const settings = { upstream: [`${UP}=${up.url}`, `private.test=${authed.url}`], credentialsFile: creds }
      const ns = await fullMesh(3, settings)
      const secrets = Array.from({ length: 6 }, () => authed.addBlob('team/secret', randomBytes(50_000)))
      await Promise.all(ns.map(async n => { for (const s of secrets) expect((await get(n, `/v2/private.test/team/secret/blobs/${s}`)).status).toBe(200) }))
      // Each node fetched each secret itself; none asked another, and none served one for a peer.
      // (Counting the GETs that carried a token: a node's first request is answered with the challenge.)
      for (const s of secrets) expect(authed.requests.filter(r => r.method === 'GET' && r.path.includes(`/blobs/${s}`) && r.headers.authorization !== undefined).length).toBe(3)
      for (const n of ns) {
        expect(await metric(n, 'pullmesh_mesh_delegated_fetches_total')).toBe(0)
        expect(await metric(n, 'pullmesh_mesh_fetches_for_peers_total')).toBe(0)
      }
    } finally {
      await authed.close()
    }
  })
})

describe('whose word counts for a tag', () => {
  it("a peer's record never overrides this node's own verified record, even a fresher one during an outage", async () => {
    const a = await node({ tagTtl: '0s' })
    const old = seedImage('library/trust', 'v1', 1, 1000)
    expect((await get(a, `/v2/${UP}/library/trust/manifests/v1`)).headers['docker-content-digest']).toBe(old.manifest)
    // The tag moves; B (connected to A) verifies the new mapping and announces it.
    const b = await node({ bootstrapFrom: [a] })
    const moved = seedImage('library/trust', 'v1', 1, 1000)
    expect((await get(b, `/v2/${UP}/library/trust/manifests/v1`)).headers['docker-content-digest']).toBe(moved.manifest)
    await until('A to learn B\'s fresher record', () => a.mesh()!.tagRecords(UP, 'library/trust', 'v1').some(r => r.record.digest === moved.manifest))
    up.setFault({ kind: 'status', status: 503 })
    const r = await get(a, `/v2/${UP}/library/trust/manifests/v1`)
    expect(r.status).toBe(200)
    expect(r.headers['docker-content-digest'], 'A answers from its own record').toBe(old.manifest)
  })

  it('a 401, 403 or 404 from the upstream is an answer: peer records are not used for it', async () => {
    const a = await node()
    seedImage('library/gone', 'v1', 1, 1000)
    expect((await get(a, `/v2/${UP}/library/gone/manifests/v1`)).status).toBe(200)
    const b = await node({ bootstrapFrom: [a] })
    await until('B to learn the tag record', () => b.mesh()!.tagRecords(UP, 'library/gone', 'v1').length > 0)
    for (const status of [404, 403, 401]) {
      up.setFault({ kind: 'status', status }, { path: /\/manifests\// })
      const r = await get(b, `/v2/${UP}/library/gone/manifests/v1`)
      expect(r.status, `upstream ${status}`).toBeGreaterThanOrEqual(400)
      expect(r.status, `upstream ${status}`).toBeLessThan(500)
    }
    expect(await metric(b, 'pullmesh_stale_tags_served_total')).toBe(0)
  })

  it('with the upstream down, a tag list is answered from the tags mesh peers know, and marked so', async () => {
    const a = await node()
    seedImage('library/listed', 'v1', 1, 1000)
    seedImage('library/listed', 'v2', 1, 1000)
    for (const t of ['v1', 'v2']) expect((await get(a, `/v2/${UP}/library/listed/manifests/${t}`)).status).toBe(200)
    const b = await node({ bootstrapFrom: [a] })
    await until('B to learn both tag records', () => b.mesh()!.tagRecords(UP, 'library/listed', 'v2').length > 0 && b.mesh()!.tagRecords(UP, 'library/listed', 'v1').length > 0)
    up.setFault({ kind: 'status', status: 503 })
    const r = await get(b, `/v2/${UP}/library/listed/tags/list`)
    expect(r.status).toBe(200)
    expect(r.headers['x-pullmesh-source']).toBe('mesh')
    expect(JSON.parse(r.body.toString())).toEqual({ name: 'library/listed', tags: ['v1', 'v2'] })
    const page = await get(b, `/v2/${UP}/library/listed/tags/list?n=1&last=v1`)
    expect(JSON.parse(page.body.toString()).tags).toEqual(['v2'])
    // A repo nobody knows still fails as the upstream does.
    expect((await get(b, `/v2/${UP}/library/unknown/tags/list`)).status).toBe(503)
  })

  it('a black-holed upstream: a tag a peer can answer is answered after one connect attempt and the peer timeout, not every retry', async () => {
    const a = await node()
    const img = seedImage('library/hole', 'v1', 1, 1000)
    expect((await get(a, `/v2/${UP}/library/hole/manifests/v1`)).status).toBe(200)
    // Generous retries and header timeouts: without the outage rule this request waits 3 × 5 s.
    const b = await node({ bootstrapFrom: [a], upstreamRetries: '3', upstreamHeadersTimeout: '5s', upstreamConnectTimeout: '1s' })
    await until('B to learn the tag record', () => b.mesh()!.tagRecords(UP, 'library/hole', 'v1').length > 0)
    up.setFault({ kind: 'hang' })
    const t0 = Date.now()
    const r = await get(b, `/v2/${UP}/library/hole/manifests/v1`)
    const ms = Date.now() - t0
    console.log(`black-holed upstream: a tag known to a peer answered in ${ms} ms (connect timeout 1 s, peer timeout 300 ms)`)
    expect(r.status).toBe(200)
    expect(r.headers['docker-content-digest']).toBe(img.manifest)
    expect(ms).toBeLessThan(4_000)
    // The breaker then answers the next one at once.
    const t1 = Date.now()
    expect((await get(b, `/v2/${UP}/library/hole/manifests/v1`)).status).toBe(200)
    expect(Date.now() - t1).toBeLessThan(1_000)
  })
})
