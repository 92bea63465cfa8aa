// Pinning an image with a large layer streams the layer through the daemon: its memory must not grow
// with the layer. (A drain that never handed the fill reader's buffers back kept every 1 MiB chunk it
// was ever lent alive: 647 MiB of peak RSS for a 512 MiB layer.)
import { randomBytes } from 'node:crypto'
import { mkdtemp, readFile, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { request } from 'undici'
import { ADMIN_HEADER } from '../../src/http/admin-routes.js'
import { MediaType } from '../../src/oci/media-types.js'
import { startDaemon, type DaemonProcess } from '../helpers/daemon-process.js'
import { startFaultUpstream, type FaultUpstream } from '../helpers/fault-upstream.js'

const LAYER = 384 * 1024 * 1024
let up: FaultUpstream
let dir = ''
let d: DaemonProcess | undefined

async function peakRssMiB (pid: number): Promise<number> {
  const status = await readFile(`/proc/${pid}/status`, 'utf8')
  const m = /^VmHWM:\s+(\d+) kB$/m.exec(status)
  if (m === null) throw new Error('no VmHWM in /proc/PID/status')
  return Number(m[1]) / 1024
}

beforeAll(async () => {
  up = await startFaultUpstream()
  dir = await mkdtemp(join(tmpdir(), 'pm-pin-mem-'))
})
afterAll(async () => {
  if (d !== undefined && !d.exited()) await d.stop()
  await up.close()
  await rm(dir, { recursive: true, force: true })
})

describe('pin memory', () => {
  it(`pinning an image with a ${LAYER / 2 ** 20} MiB layer keeps the daemon's peak RSS far below the layer size`, async () => {
    const layer = randomBytes(LAYER)
    const layerD = up.addBlob('library/big', layer)
    const cfg = Buffer.from(JSON.stringify({ architecture: 'amd64', os: 'linux', rootfs: { type: 'layers', diff_ids: [] } }))
    const cfgD = up.addBlob('library/big', cfg)
    up.addManifest('library/big', 'v1', {
      schemaVersion: 2,
      mediaType: MediaType.ociManifest,
      config: { mediaType: 'application/vnd.oci.image.config.v1+json', digest: cfgD, size: cfg.length },
      layers: [{ mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip', digest: layerD, size: layer.length }],
    }, MediaType.ociManifest)
    d = await startDaemon({ dataDir: dir, upstreams: { 'pin.test': up.url }, logLevel: 'info', startTimeoutMs: 60_000 })
    const before = await peakRssMiB(d.pid)
    const res = await request(`${d.url}/pullmesh/v1/pins`, {
      method: 'POST',
      headers: { [ADMIN_HEADER]: '1', 'content-type': 'application/json' },
      body: JSON.stringify({ image: 'pin.test/library/big:v1' }),
      bodyTimeout: 300_000,
      headersTimeout: 300_000,
    })
    const body = await res.body.text()
    expect(res.statusCode, body).toBe(200)
    const peak = await peakRssMiB(d.pid)
    console.log(`pin of a ${LAYER / 2 ** 20} MiB layer: daemon peak RSS ${peak.toFixed(0)} MiB (${before.toFixed(0)} MiB after start)`)
    expect(peak).toBeLessThan(256)
  }, 300_000)
})
