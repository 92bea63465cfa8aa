// SIGTERM drains: a real daemon process lets a download in flight finish (within --shutdown-grace)
// while new requests get 503, and cuts what is still running when the grace period is over.
import { createHash, randomBytes } from 'node:crypto'
import { mkdtemp, rm } from 'node:fs/promises'
import { request as httpRequest, type IncomingMessage } from 'node:http'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterEach, describe, expect, it } from 'vitest'
import { startDaemon, type DaemonProcess } from '../helpers/daemon-process.js'
import { startFaultUpstream, type FaultUpstream } from '../helpers/fault-upstream.js'
import { simpleRequest } from '../helpers/net.js'

const sha = (b: Buffer): string => `sha256:${createHash('sha256').update(b).digest('hex')}`
const sleep = async (ms: number): Promise<void> => { await new Promise(resolve => setTimeout(resolve, ms)) }

const cleanups: Array<() => Promise<void>> = []
afterEach(async () => { for (const c of cleanups.splice(0).reverse()) await c() })

async function setup (extraArgs: string[]): Promise<{ up: FaultUpstream, d: DaemonProcess }> {
  const up = await startFaultUpstream()
  cleanups.push(async () => { await up.close() })
  const dir = await mkdtemp(join(tmpdir(), 'pm-drain-'))
  cleanups.push(async () => { await rm(dir, { recursive: true, force: true }) })
  const d = await startDaemon({ dataDir: dir, upstreams: { 'fault.test': up.url }, extraArgs })
  cleanups.push(async () => { await d.kill() })
  return { up, d }
}

/** Starts a GET and resolves once the response headers are in; the body is read by the caller. */
async function open (url: string): Promise<IncomingMessage> {
  return await new Promise((resolve, reject) => {
    const req = httpRequest(url, { agent: false }, resolve)
    req.on('error', reject)
    req.end()
  })
}

/** Reads a body slowly (a pause between chunks); reports whether it ended complete. */
async function readSlowly (res: IncomingMessage, pauseMs: number): Promise<{ body: Buffer, complete: boolean }> {
  const chunks: Buffer[] = []
  return await new Promise(resolve => {
    res.on('data', (c: Buffer) => {
      chunks.push(c)
      res.pause()
      setTimeout(() => res.resume(), pauseMs)
    })
    res.on('error', () => {})
    res.on('close', () => resolve({ body: Buffer.concat(chunks), complete: res.complete }))
  })
}

async function until503 (url: string, timeoutMs: number): Promise<number> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const r = await simpleRequest(url, { timeoutMs: 2000 }).catch(() => undefined)
    if (r?.status === 503) return r.status
    if (Date.now() > deadline) throw new Error('no 503 while draining')
    await sleep(50)
  }
}

describe('SIGTERM drains downloads in flight', () => {
  it('finishes a slow download in flight, answers new requests 503 meanwhile, then exits 0', async () => {
    const { up, d } = await setup([]) // the default grace (10 s)
    const data = randomBytes(4 * 1024 * 1024)
    const digest = up.addBlob('team/app', data)
    const other = up.addBlob('team/app', randomBytes(1000))
    // A cold miss from a slow upstream, read slowly by its client: a few seconds in flight.
    up.setFault({ kind: 'slow', chunkBytes: 256 * 1024, delayMs: 150 }, { path: new RegExp(digest) })
    const res = await open(`${d.url}/v2/fault.test/team/app/blobs/${digest}`)
    expect(res.statusCode).toBe(200)
    const reading = readSlowly(res, 20)
    const t0 = Date.now()
    const stopped = d.stop('SIGTERM', 30_000)
    expect(await until503(`${d.url}/v2/fault.test/team/app/blobs/${other}`, 5000)).toBe(503)
    const got = await reading
    expect(got.complete).toBe(true)
    expect(got.body.length).toBe(data.length)
    expect(sha(got.body)).toBe(digest)
    expect(await stopped).toBe(0)
    console.log(`drain: the download in flight finished and the daemon exited ${Date.now() - t0} ms after SIGTERM`)
  })

  it('cuts what still runs when the grace period is over', async () => {
    const { up, d } = await setup(['--shutdown-grace', '1s'])
    const digest = up.addBlob('team/app', randomBytes(2 * 1024 * 1024))
    // 8 chunks, one a second: far longer than the grace period.
    up.setFault({ kind: 'slow', chunkBytes: 256 * 1024, delayMs: 1000 }, { path: new RegExp(digest) })
    const res = await open(`${d.url}/v2/fault.test/team/app/blobs/${digest}`)
    const reading = readSlowly(res, 0)
    const t0 = Date.now()
    expect(await d.stop('SIGTERM', 30_000)).toBe(0)
    const ms = Date.now() - t0
    const got = await reading
    expect(got.complete).toBe(false)
    console.log(`drain: grace 1s, the daemon cut the stalled download and exited ${ms} ms after SIGTERM`)
    expect(ms).toBeLessThan(10_000)
  })
})
