// HTTP/1.1 pipelining: a warm blob GET sent on the same connection right behind another request must
// be answered once the first response is done (Node attaches the socket to it only then).
import { createHash, randomBytes } from 'node:crypto'
import { connect } from 'node:net'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import type { Daemon } from '../../src/daemon.js'
import { parseDigest } from '../../src/oci/digest.js'
import type { FaultUpstream } from '../helpers/fault-upstream.js'
import { startFaultDaemon, type FaultDaemon } from '../helpers/fault-daemon.js'
import { simpleRequest } from '../helpers/net.js'

const sha = (b: Buffer): string => `sha256:${createHash('sha256').update(b).digest('hex')}`

interface Parsed { status: number, body: Buffer }

/** Sends `raw` on one connection and parses `count` responses (Content-Length bodies); gives up after `timeoutMs`. */
async function pipelined (port: number, raw: string, count: number, timeoutMs: number): Promise<Parsed[]> {
  return await new Promise((resolve, reject) => {
    const sock = connect(port, '127.0.0.1', () => { sock.write(raw) })
    let buf = Buffer.alloc(0)
    const out: Parsed[] = []
    const timer = setTimeout(() => {
      sock.destroy()
      reject(new Error(`only ${out.length} of ${count} pipelined responses within ${timeoutMs} ms`))
    }, timeoutMs)
    sock.on('data', (chunk: Buffer) => {
      buf = Buffer.concat([buf, chunk])
      for (;;) {
        const end = buf.indexOf('\r\n\r\n')
        if (end < 0) return
        const head = buf.subarray(0, end).toString('latin1')
        const status = Number(/^HTTP\/1\.1 (\d{3})/.exec(head)?.[1])
        const length = Number(/\r\ncontent-length: *(\d+)/i.exec(head)?.[1] ?? '0')
        if (buf.length < end + 4 + length) return
        out.push({ status, body: buf.subarray(end + 4, end + 4 + length) })
        buf = buf.subarray(end + 4 + length)
        if (out.length === count) { clearTimeout(timer); sock.destroy(); resolve(out); return }
      }
    })
    sock.on('error', e => { clearTimeout(timer); reject(e) })
  })
}

describe('pipelined requests', () => {
  let f: FaultDaemon | undefined
  let up: FaultUpstream
  let daemon: Daemon
  beforeAll(async () => {
    f = await startFaultDaemon({ dirPrefix: 'pm-pipe-' })
    up = f.up
    daemon = f.daemon
  })
  afterAll(async () => { await f?.close() })

  it('answers a warm blob GET pipelined behind a slow response on the same connection', async () => {
    const warm = randomBytes(3 * 1024 * 1024 + 7)
    const warmDigest = up.addBlob('team/app', warm)
    expect((await simpleRequest(`${daemon.url()}/v2/fault.test/team/app/blobs/${warmDigest}`)).status).toBe(200)
    await expect.poll(async () => await daemon.store.stat(parseDigest(warmDigest))).toBeDefined()

    // The first response takes a while (a cold blob from a slow upstream): the second waits behind it.
    const cold = randomBytes(512 * 1024)
    const coldDigest = up.addBlob('team/app', cold)
    up.setFault({ kind: 'slow', chunkBytes: 64 * 1024, delayMs: 60 }, { path: new RegExp(coldDigest) })
    const port = Number(new URL(daemon.url()).port)
    const req = (d: string): string => `GET /v2/fault.test/team/app/blobs/${d} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n`
    const [first, second, third] = await pipelined(port, req(coldDigest) + req(warmDigest) + req(warmDigest), 3, 20_000)
    expect(first!.status).toBe(200)
    expect(sha(first!.body)).toBe(coldDigest)
    expect(second!.status).toBe(200)
    expect(sha(second!.body)).toBe(warmDigest)
    expect(third!.status).toBe(200)
    expect(sha(third!.body)).toBe(warmDigest)
  })
})
