// Fail fast against a dead upstream: a cold miss has an overall deadline before response headers,
// and a per-upstream circuit breaker answers every later request at once (503 + Retry-After) for its
// hold time, then lets one probe through (half-open) while the others still fail fast.
import { randomBytes } from 'node:crypto'
import { mkdtemp, rm } from 'node:fs/promises'
import { createServer, type Server, type Socket } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterEach, describe, expect, it } from 'vitest'
import { buildConfig, type RawSettings } from '../../src/config.js'
import { createDaemon, type Daemon } from '../../src/daemon.js'
import { createLogger } from '../../src/logger.js'
import { MediaType } from '../../src/oci/media-types.js'
import { startFaultUpstream, type FaultUpstream } from '../helpers/fault-upstream.js'
import { simpleRequest } from '../helpers/net.js'

const cleanups: Array<() => Promise<void>> = []
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c()
})

async function startDaemon (upstream: string, settings: RawSettings = {}): Promise<Daemon> {
  const dir = await mkdtemp(join(tmpdir(), 'pm-failfast-'))
  const d = createDaemon(buildConfig({ listen: '127.0.0.1:0', dataDir: dir, upstream: [upstream], mesh: false, mdns: false, ...settings }, {}), { logger: createLogger('silent') })
  await d.start()
  cleanups.push(async () => { await d.stop(); await rm(dir, { recursive: true, force: true }) })
  return d
}

/** A TCP server that accepts every connection and never answers: a black-holed upstream. */
async function startBlackHole (): Promise<{ url: string, connections: () => number }> {
  const sockets = new Set<Socket>()
  let count = 0
  const server: Server = createServer(s => { count++; sockets.add(s); s.on('error', () => {}); s.once('close', () => sockets.delete(s)) })
  await new Promise<void>(resolve => server.listen(0, '127.0.0.1', resolve))
  cleanups.push(async () => {
    for (const s of sockets) s.destroy()
    await new Promise<void>(resolve => server.close(() => { resolve() }))
  })
  return { url: `http://127.0.0.1:${(server.address() as { port: number }).port}`, connections: () => count }
}

async function timedGet (url: string, method = 'GET'): Promise<{ status: number, ms: number, headers: Record<string, unknown>, body: Buffer }> {
  const t0 = performance.now()
  const r = await simpleRequest(url, { method, timeoutMs: 120_000 })
  return { status: r.status, ms: Math.round(performance.now() - t0), headers: r.headers, body: r.body }
}

const digestOf = (n: number): string => `sha256:${n.toString(16).padStart(64, '0')}`

describe('fail fast against a dead upstream', () => {
  it('fails the first cold miss within the deadline (defaults) and the next ones at once', async () => {
    const hole = await startBlackHole()
    // Every default left alone (deadline 10s, hold 15s, headers timeout 30s, 3 attempts): what users get.
    const d = await startDaemon(`dead.test=${hole.url}`)
    const first = await timedGet(`${d.url()}/v2/dead.test/team/app/blobs/${digestOf(1)}`)
    const second = await timedGet(`${d.url()}/v2/dead.test/team/app/blobs/${digestOf(2)}`)
    const manifest = await timedGet(`${d.url()}/v2/dead.test/team/app/manifests/v1`)
    console.log(`dead upstream (defaults): first cold blob miss failed after ${first.ms} ms, second after ${second.ms} ms, a cold tag after ${manifest.ms} ms`)
    expect(first.status).toBe(503)
    expect(second.status).toBe(503)
    expect(manifest.status).toBe(503)
    // Generous bounds on what the issue asks to measure (before: over 60 s, twice).
    expect(first.ms).toBeLessThan(20_000)
    expect(second.ms).toBeLessThan(2_000)
    expect(manifest.ms).toBeLessThan(2_000)
    expect(Number(second.headers['retry-after'])).toBeGreaterThan(0)
    expect((JSON.parse(second.body.toString()) as { errors: Array<{ code: string }> }).errors[0]!.code).toBe('UNAVAILABLE')
    // The breaker kept the later requests off the dead upstream entirely.
    const before = hole.connections()
    await timedGet(`${d.url()}/v2/dead.test/team/app/blobs/${digestOf(3)}`)
    expect(hole.connections()).toBe(before)
  })

  it('half-opens after the hold: one probe goes through while the others still fail fast, then all pass', async () => {
    const up: FaultUpstream = await startFaultUpstream()
    cleanups.push(async () => { await up.close() })
    const blob = randomBytes(1000)
    const digest = up.addBlob('team/app', blob)
    up.addManifest('team/app', 'v1', { schemaVersion: 2, mediaType: MediaType.ociManifest, config: { mediaType: 'application/vnd.oci.image.config.v1+json', digest, size: blob.length }, layers: [] }, MediaType.ociManifest)
    const d = await startDaemon(`flaky.test=${up.url}`, { upstreamDeadline: '1s', upstreamHold: '1500ms', upstreamRetries: '1' })
    const blobUrl = `${d.url()}/v2/flaky.test/team/app/blobs/${digest}`
    const tagUrl = `${d.url()}/v2/flaky.test/team/app/manifests/v1`

    up.setFault({ kind: 'hang' })
    const trip = await timedGet(blobUrl)
    expect(trip.status).toBe(503)
    up.setFault(undefined)
    // Open: the upstream is healthy again but is not asked until the hold ends.
    const n = up.requests.length
    expect((await timedGet(tagUrl)).status).toBe(503)
    expect(up.requests.length).toBe(n)

    await new Promise(resolve => setTimeout(resolve, 1600))
    // Half-open: the probe hangs (and fails at the deadline); a request meanwhile fails at once.
    up.setFault({ kind: 'hang' }, { times: 1 })
    const probe = timedGet(blobUrl)
    await new Promise(resolve => setTimeout(resolve, 200))
    const during = await timedGet(tagUrl)
    expect(during.status).toBe(503)
    expect(during.ms).toBeLessThan(500)
    expect((await probe).status).toBe(503)

    // Open again for the hold; then the next probe succeeds and closes the breaker.
    expect((await timedGet(tagUrl)).status).toBe(503)
    await new Promise(resolve => setTimeout(resolve, 1600))
    expect((await timedGet(tagUrl)).status).toBe(200)
    const ok = await timedGet(blobUrl)
    expect(ok.status).toBe(200)
    expect(ok.body.equals(blob)).toBe(true)
  })
})
