// The peer data path under attack and misconfiguration, with real daemons on loopback: signatures bound
// to the target node, the request (path, query, range), a short window and a one-time nonce; key files
// that differ only in line endings make one mesh; a key mismatch is logged as such; sha512 blobs move
// between peers; requests that trickle in are cut off on the peer port and on the client API.
import { createHash, randomBytes } from 'node:crypto'
import { writeFile, readFile } from 'node:fs/promises'
import { connect } from 'node:net'
import { join } from 'node:path'
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest'
import { buildConfig } from '../../src/config.js'
import type { Daemon } from '../../src/daemon.js'
import { parseDigest } from '../../src/oci/digest.js'
import { generateMeshKey } from '../../src/mesh/index.js'
import { parseMeshKey } from '../../src/mesh/psk.js'
import { AUTH_ERROR_HEADER, AUTH_HEADER, PEER_BLOB_PATH, dataPathKey, signRequest } from '../../src/peer-protocol.js'
import { startFaultUpstream, type FaultUpstream } from '../helpers/fault-upstream.js'
import { simpleRequest } from '../helpers/net.js'
import { loopbackMesh, until, type LogLine } from '../helpers/loopback-mesh.js'

const sha256 = (b: Buffer): string => `sha256:${createHash('sha256').update(b).digest('hex')}`
const UP = 'auth.test'

let up: FaultUpstream
const mesh = loopbackMesh({ upstreamName: UP, upstreamUrl: () => up.url, dirPrefix: 'pm-auth-', settings: { peerTimeout: '2s' } })
const { node, tempDir } = mesh

const holds = (n: Daemon, d: string): boolean => n.mesh()!.holders(parseDigest(d)).length > 0
const blobGets = (): number => up.requests.filter(r => r.method === 'GET' && r.path.includes('/blobs/')).length
const peerId = (n: Daemon): string => n.mesh()!.status().peerId

async function keyFile (contents: Uint8Array | string): Promise<string> {
  const f = join(await tempDir(), 'mesh.key')
  await writeFile(f, contents, { mode: 0o600 })
  return f
}

/** A client GET through `n`, then waits for the blob to be committed to its store. */
async function pull (n: Daemon, digest: string): Promise<Buffer> {
  const r = await simpleRequest(`${n.url()}/v2/${UP}/library/app/blobs/${digest}`, { timeoutMs: 30_000 })
  expect(r.status, `pull ${digest}`).toBe(200)
  await until(`${digest} committed`, async () => (await n.store.stat(parseDigest(digest))) !== undefined)
  return r.body
}

/**
 * Opens a raw connection, sends `head`, then one more byte of `rest` every 500 ms. Resolves with the
 * ms until the server closed the connection, or -1 if it was still open after `maxMs`.
 */
async function trickle (url: string, head: string, rest: string, maxMs: number): Promise<{ closedAfterMs: number, response: string }> {
  const u = new URL(url)
  return await new Promise(resolve => {
    const t0 = Date.now()
    const sock = connect(Number(u.port), u.hostname)
    let response = ''
    let i = 0
    let done = false
    const finish = (ms: number): void => {
      if (done) return
      done = true
      clearInterval(tick)
      clearTimeout(limit)
      sock.destroy()
      resolve({ closedAfterMs: ms, response })
    }
    sock.on('data', (b: Buffer) => { response += b.toString('latin1') })
    sock.on('close', () => finish(Date.now() - t0))
    sock.on('error', () => {})
    sock.write(head)
    const tick = setInterval(() => { if (i < rest.length && !sock.destroyed) sock.write(rest[i++]!) }, 500)
    const limit = setTimeout(() => finish(-1), maxMs)
  })
}

beforeAll(async () => { up = await startFaultUpstream() })
afterEach(async () => {
  await mesh.stopNodes()
  up.setFault(undefined)
  up.requests.length = 0
})
afterAll(async () => {
  await up.close()
  await mesh.close()
})

describe('data-path signatures', () => {
  it('a signature is good once, for one node, one method, path, query and range, within 30 s', async () => {
    const file = await keyFile(generateMeshKey())
    const key = dataPathKey(parseMeshKey(await readFile(file)))
    const a = await node({ meshKey: file })
    const b = await node({ meshKey: file })
    const data = randomBytes(20_000)
    const d = up.addBlob('library/app', data)
    await pull(a, d)
    await pull(b, d)
    const path = PEER_BLOB_PATH + d
    const send = async (n: Daemon, url: string, header: string, range?: string): Promise<{ status: number, reason: unknown, body: Buffer }> => {
      const r = await simpleRequest(n.peerUrl()! + url, { headers: { [AUTH_HEADER]: header, ...(range !== undefined ? { range } : {}) } })
      return { status: r.status, reason: r.headers[AUTH_ERROR_HEADER], body: r.body }
    }

    // The legitimate request works, once.
    const forB = signRequest(key, { target: peerId(b), method: 'GET', url: path })
    const okB = await send(b, path, forB)
    expect(okB.status).toBe(200)
    expect(sha256(okB.body)).toBe(d)
    // Captured and replayed to another node of the same mesh (which holds the blob too): refused.
    expect(await send(a, path, forB)).toMatchObject({ status: 401, reason: 'signature' })
    // Replayed to the node it was made for: the nonce is used up.
    expect(await send(b, path, forB)).toMatchObject({ status: 401, reason: 'replayed' })

    // Fresh signatures, each moved to another request: refused, and the same one still works where it belongs.
    const other = up.addBlob('library/app', randomBytes(1000))
    await pull(a, other)
    const forA = (url: string, range?: string): string => signRequest(key, { target: peerId(a), method: 'GET', url, ...(range !== undefined ? { range } : {}) })
    expect(await send(a, PEER_BLOB_PATH + other, forA(path))).toMatchObject({ status: 401, reason: 'signature' })
    expect(await send(a, `${path}?u=${UP}&repo=library/evil`, forA(`${path}?u=${UP}&repo=library/app`))).toMatchObject({ status: 401, reason: 'signature' })
    expect(await send(a, path, forA(path, 'bytes=0-9'), 'bytes=0-19999')).toMatchObject({ status: 401, reason: 'signature' })
    expect(await send(a, path, forA(path), 'bytes=0-9')).toMatchObject({ status: 401, reason: 'signature' })
    const head = await simpleRequest(a.peerUrl()! + path, { method: 'HEAD', headers: { [AUTH_HEADER]: forA(path) } })
    expect(head.status).toBe(401)
    const ranged = await send(a, path, forA(path, 'bytes=0-9'), 'bytes=0-9')
    expect(ranged.status).toBe(206)
    expect(ranged.body).toEqual(data.subarray(0, 10))
    const withQuery = `${path}?u=${UP}&repo=library/app`
    expect((await send(a, withQuery, forA(withQuery))).status).toBe(200)

    // Older than the 30 s window, or from too far in the future: refused.
    expect(await send(a, path, signRequest(key, { target: peerId(a), method: 'GET', url: path }, Date.now() - 31_000))).toMatchObject({ status: 401, reason: 'expired' })
    expect(await send(a, path, signRequest(key, { target: peerId(a), method: 'GET', url: path }, Date.now() + 31_000))).toMatchObject({ status: 401, reason: 'expired' })
    // Unsigned and malformed: refused, on every route.
    expect(await send(a, '/pullmesh/v1/nothing', 'x')).toMatchObject({ status: 401, reason: 'malformed' })
    expect((await simpleRequest(a.peerUrl()! + path)).status).toBe(401)
  })

  it('a key mismatch is logged as such by the node that refuses it, once per minute per address', async () => {
    const logs: LogLine[] = []
    const a = await node({ meshKey: await keyFile(generateMeshKey()), logs })
    const d = up.addBlob('library/app', randomBytes(1000))
    await pull(a, d)
    const path = PEER_BLOB_PATH + d
    const stranger = dataPathKey(parseMeshKey(generateMeshKey()))
    for (let i = 0; i < 3; i++) {
      const r = await simpleRequest(a.peerUrl()! + path, { headers: { [AUTH_HEADER]: signRequest(stranger, { target: peerId(a), method: 'GET', url: path }) } })
      expect(r.status).toBe(401)
      expect(r.headers[AUTH_ERROR_HEADER]).toBe('key')
    }
    const warns = logs.filter(l => l.level === 40 && l.reason === 'key')
    expect(warns).toHaveLength(1)
    expect(warns[0]!.msg).toMatch(/different mesh key/)
    expect(warns[0]!.remote).toBe('127.0.0.1')
  })
})

describe('mesh keys', () => {
  it('key files that differ only in CRLF line endings and a trailing newline make one mesh that shares blobs both ways', async () => {
    const lf = Buffer.from(generateMeshKey())
    expect(lf.includes(0x0d)).toBe(false)
    const crlf = Buffer.from(`${lf.toString('utf8').split('\n').join('\r\n')}\r\n`)
    const a = await node({ meshKey: await keyFile(lf) })
    const b = await node({ meshKey: await keyFile(crlf), bootstrapFrom: [a] })
    const x = up.addBlob('library/app', randomBytes(50_000))
    const y = up.addBlob('library/app', randomBytes(50_000))
    await pull(a, x)
    await until('B to learn that A holds x', () => holds(b, x))
    expect(sha256(await pull(b, x))).toBe(x)
    await pull(b, y)
    await until('A to learn that B holds y', () => holds(a, y))
    expect(sha256(await pull(a, y))).toBe(y)
    // Each blob came from the upstream once: the second node took it from its peer.
    expect(blobGets()).toBe(2)
  })

  it('a malformed key file is refused at start-up with a clear message', async () => {
    const good = Buffer.from(generateMeshKey()).toString('utf8')
    for (const bad of [good.replace('/base16/', '/base64/'), good.slice(0, -2), `${good}\nextra`, 'not a key']) {
      const f = await keyFile(bad)
      expect(() => buildConfig({ meshKey: f, dataDir: '/tmp/x' }, {})).toThrow(/mesh-key .*not a mesh key file/)
    }
  })
})

describe('peer port limits', () => {
  it('serves a sha512 blob to a peer', async () => {
    const a = await node()
    const b = await node({ bootstrapFrom: [a] })
    const data = randomBytes(30_000)
    const d = parseDigest(`sha512:${createHash('sha512').update(data).digest('hex')}`)
    await a.store.putBuffer(d, data, { mediaType: 'application/octet-stream', repo: 'library/app' })
    const direct = await simpleRequest(a.peerUrl()! + PEER_BLOB_PATH + d)
    expect(direct.status).toBe(200)
    expect(direct.body).toEqual(data)
    await until('B to learn that A holds the sha512 blob', () => holds(b, d))
    const r = await simpleRequest(`${b.url()}/v2/${UP}/library/app/blobs/${d}`, { timeoutMs: 30_000 })
    expect(r.status).toBe(200)
    expect(r.body).toEqual(data)
    expect(blobGets()).toBe(0)
  })

  it('requests that trickle in are cut off, on the peer port and on the client API', async () => {
    const file = await keyFile(generateMeshKey())
    const a = await node({ meshKey: file })
    const blob = `${PEER_BLOB_PATH}sha256:${'1'.repeat(64)}`
    const signed = signRequest(dataPathKey(parseMeshKey(await readFile(file))), { target: peerId(a), method: 'GET', url: blob })
    const filler = 'x'.repeat(200)
    const [peerHeaders, peerBody, peerSignedBody, apiHeaders, apiBody] = await Promise.all([
      // Headers a byte at a time (5 s allowed on the peer port).
      trickle(a.peerUrl()!, `GET ${blob} HTTP/1.1\r\nHost: peer\r\n`, `X-Slow: ${filler}`, 20_000),
      // A body a byte at a time after the headers: refused (401) and closed.
      trickle(a.peerUrl()!, `GET ${blob} HTTP/1.1\r\nHost: peer\r\nContent-Length: 200\r\n\r\n`, filler, 20_000),
      // A signed request (answered 404) whose body trickles: 10 s for a whole request.
      trickle(a.peerUrl()!, `GET ${blob} HTTP/1.1\r\nHost: peer\r\n${AUTH_HEADER}: ${signed}\r\nContent-Length: 200\r\n\r\n`, filler, 25_000),
      // The client API: 15 s for headers, 30 s for a whole request.
      trickle(a.url(), 'GET /v2/ HTTP/1.1\r\nHost: api\r\n', `X-Slow: ${filler}`, 40_000),
      trickle(a.url(), 'POST /pullmesh/v1/gc HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n', filler, 45_000),
    ])
    console.log(`trickling requests closed after: peer headers ${peerHeaders.closedAfterMs} ms, peer body ${peerBody.closedAfterMs} ms, signed peer body ${peerSignedBody.closedAfterMs} ms, api headers ${apiHeaders.closedAfterMs} ms, api body ${apiBody.closedAfterMs} ms`)
    expect(peerHeaders.closedAfterMs).toBeGreaterThan(0)
    expect(peerBody.closedAfterMs).toBeGreaterThan(0)
    expect(peerBody.response).toMatch(/^HTTP\/1\.1 401/)
    expect(peerSignedBody.closedAfterMs).toBeGreaterThan(0)
    expect(peerSignedBody.response).toMatch(/^HTTP\/1\.1 404/)
    expect(apiHeaders.closedAfterMs).toBeGreaterThan(0)
    expect(apiBody.closedAfterMs).toBeGreaterThan(0)
  })
})
