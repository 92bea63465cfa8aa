// A client that hangs up while it waits on a cold miss is a client abort: logged as such at info,
// counted under status 499 (as nginx does), never as a 5xx.
import { randomBytes } from 'node:crypto'
import { request as httpRequest } from 'node:http'
import { Writable } from 'node:stream'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import type { Daemon } from '../../src/daemon.js'
import { createLogger } from '../../src/logger.js'
import type { FaultUpstream } from '../helpers/fault-upstream.js'
import { startFaultDaemon, type FaultDaemon } from '../helpers/fault-daemon.js'

let f: FaultDaemon | undefined
let up: FaultUpstream
let daemon: Daemon
const lines: Array<Record<string, unknown>> = []

beforeAll(async () => {
  const sink = new Writable({ write (chunk: Buffer, _e, cb) { for (const l of chunk.toString().split('\n')) if (l !== '') lines.push(JSON.parse(l) as Record<string, unknown>); cb() } })
  f = await startFaultDaemon({ dirPrefix: 'pm-abort-', settings: { upstreamDeadline: '5s', upstreamHold: '1s' }, logger: createLogger('info', sink) })
  up = f.up
  daemon = f.daemon
})
afterAll(async () => { await f?.close() })

/** Sends a GET and hangs up after `ms` without having had an answer. */
async function hangUpAfter (url: string, ms: number): Promise<void> {
  await new Promise<void>(resolve => {
    const req = httpRequest(url, { agent: false }, () => { resolve() })
    req.on('error', () => { resolve() })
    req.end()
    setTimeout(() => { req.destroy(); resolve() }, ms)
  })
}

describe('client aborts during a cold wait', () => {
  it('are logged and counted as client aborts, not as 5xx', async () => {
    const d = up.addBlob('team/app', randomBytes(1000))
    up.setFault({ kind: 'hang' }, { path: /\/blobs\//, times: 1 })
    await hangUpAfter(`${daemon.url()}/v2/fault.test/team/app/blobs/${d}`, 300)
    up.setFault({ kind: 'hang' }, { path: /\/manifests\//, times: 1 })
    await hangUpAfter(`${daemon.url()}/v2/fault.test/team/app/manifests/v1`, 300)
    // The deadline (5 s) passes for the abandoned upstream requests too: nothing is logged as a failed request.
    await new Promise(resolve => setTimeout(resolve, 5500))
    const requests = lines.filter(l => l.msg === 'request')
    expect(requests.map(r => r.statusCode)).toEqual([499, 499])
    expect(requests.every(r => r.aborted === true && r.level === 30)).toBe(true)
    expect(lines.filter(l => l.msg === 'request failed')).toEqual([])
    const metrics = await daemon.metrics.registry.metrics()
    expect(metrics).toMatch(/pullmesh_http_requests_total\{route="blob",method="GET",status="499"\} 1/)
    expect(metrics).not.toMatch(/pullmesh_http_requests_total\{[^}]*status="5\d\d"\}/)
  })

  it('a client that hung up during a manifest wait costs no more upstream requests once the flight ends', async () => {
    // An index whose tag answer is slow (about 1 s); a client that takes only single manifests would get the
    // linux/amd64 manifest picked from it. It hangs up at 300 ms: once the index arrives, nothing more is fetched
    // for it (before the fix, its handler went on waiting and then fetched the platform manifest for nobody).
    const config = up.addBlob('team/multi', Buffer.from('{"architecture":"amd64","os":"linux"}'))
    const platform = up.addManifest('team/multi', undefined, {
      schemaVersion: 2,
      mediaType: 'application/vnd.oci.image.manifest.v1+json',
      config: { mediaType: 'application/vnd.oci.image.config.v1+json', digest: config, size: 37 },
      layers: []
    }, 'application/vnd.oci.image.manifest.v1+json')
    const index = {
      schemaVersion: 2,
      mediaType: 'application/vnd.oci.image.index.v1+json',
      manifests: [{ mediaType: 'application/vnd.oci.image.manifest.v1+json', digest: platform, size: 1, platform: { os: 'linux', architecture: 'amd64' } }]
    }
    up.addManifest('team/multi', 'v1', index, 'application/vnd.oci.image.index.v1+json')
    up.setFault({ kind: 'slow', chunkBytes: 32, delayMs: 100 }, { path: /\/manifests\/v1$/, times: 1 })
    // The test before left the upstream's breaker open for its hold (1 s here).
    await new Promise(resolve => setTimeout(resolve, 1500))
    up.requests.length = 0
    await new Promise<void>(resolve => {
      const req = httpRequest(`${daemon.url()}/v2/fault.test/team/multi/manifests/v1`, { agent: false, headers: { accept: 'application/vnd.oci.image.manifest.v1+json' } }, () => { resolve() })
      req.on('error', () => { resolve() })
      req.end()
      setTimeout(() => { req.destroy(); resolve() }, 300)
    })
    const indexDone = Date.now() + 15_000
    while (!up.requests.some(r => r.path.endsWith('/manifests/v1')) && Date.now() < indexDone) await new Promise(resolve => setTimeout(resolve, 50))
    // The slow index takes ~1.2 s; give the old behaviour ample time to show.
    await new Promise(resolve => setTimeout(resolve, 2500))
    const paths = up.requests.map(r => `${r.method} ${r.path}`)
    expect(paths).toContain('GET /v2/team/multi/manifests/v1')
    expect(paths.filter(p => p.includes(platform))).toEqual([])
  })
})
