// Crash safety: SIGKILL the daemon while several skopeo processes are filling
// a larger image through it from a slow upstream, restart it on the same data
// dir, and check that nothing half-written survives and the next pull is whole.
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { startContainerd, writeHostsToml, type Containerd } from '../helpers/containerd.js'
import { restartDaemon, startDaemon, type DaemonOptions, type DaemonProcess } from '../helpers/daemon-process.js'
import { startRegistry, type RegistryProcess } from '../helpers/registry.js'
import { requireBinaries, requireRoot, run, timed, waitFor, type RunResult } from '../helpers/exec.js'
import { allDigests, buildImage, pushImage, verifyOciLayout, type BuiltImage } from '../helpers/images.js'
import {
  blobGets, logBarrier, parseRegistryAccess, startThrottleProxy, tmpFiles, verifyDataDirBlobs,
  upstreamAlias, type Throttle,
} from './support.js'

const LAYERS = 4
const LAYER_BYTES = 12 << 20 // 12 MiB each, 48 MiB in all
const RATE = 8 << 20 // upstream → daemon at ~8 MiB/s per connection: a layer takes ~1.5 s
const CLIENTS = 3

let work = ''
let reg: RegistryProcess | undefined
let proxy: Throttle | undefined
let daemon: DaemonProcess | undefined
let ctrd: Containerd | undefined
let img: BuiltImage | undefined
let opts: DaemonOptions | undefined
const closers: Array<() => Promise<void>> = []

function must<T> (v: T | undefined, what: string): T {
  if (v === undefined) throw new Error(`${what} was not started (see beforeAll failure)`)
  return v
}

/** `n` concurrent skopeo copies into OCI layouts (an oci: destination downloads layers in parallel). */
async function skopeoCopies (n: number, allowFailure: boolean): Promise<Array<{ dir: string, result: RunResult }>> {
  const d = must(daemon, 'daemon')
  const p = must(proxy, 'proxy')
  return await Promise.all(Array.from({ length: n }, async () => {
    const dir = await mkdtemp(join(work, 'copy-'))
    const result = await run('skopeo', ['copy', '--quiet', '--src-tls-verify=false',
      `docker://${d.host}/${upstreamAlias(p.port)}/library/big:1`, `oci:${join(dir, 'img')}:1`], { allowFailure, timeoutMs: 120_000 })
    return { dir, result }
  }))
}

describe('e2e: SIGKILL mid-fill, restart on the same data dir', () => {
  beforeAll(async () => {
    requireRoot()
    requireBinaries('docker-registry', 'skopeo', 'containerd', 'ctr', 'umount')
    work = await mkdtemp(join(tmpdir(), 'pullmesh-crash-'))
    closers.push(async () => { await rm(work, { recursive: true, force: true }) })
    reg = await startRegistry()
    closers.push(async () => { await reg?.close() })
    img = await buildImage({ layers: LAYERS, layerBytes: LAYER_BYTES, dir: work })
    await pushImage(img.layoutDir, `${reg.host}/library/big:1`)
    proxy = await startThrottleProxy({ host: '127.0.0.1', port: reg.port }, RATE)
    closers.push(async () => { await proxy?.close() })
    opts = { dataDir: join(work, 'data'), upstreams: { [proxy.host]: proxy.url, [upstreamAlias(proxy.port)]: proxy.url } }
    daemon = await startDaemon(opts)
    closers.push(async () => { await daemon?.stop() })
  }, 180_000)

  afterAll(async () => {
    const errors: unknown[] = []
    for (const close of closers.reverse()) {
      try { await close() } catch (e) { errors.push(e) }
    }
    if (errors.length > 0) throw new AggregateError(errors, 'e2e cleanup failed')
  }, 60_000)

  it('survives SIGKILL during concurrent fills: tmp/ is empty after restart, every stored blob is whole, the next pulls verify', async () => {
    const image = must(img, 'image')
    const r = must(reg, 'registry')
    const dataDir = must(opts, 'options').dataDir

    // 1. Concurrent cold pulls; kill the daemon once the fill is under way but not finished.
    const pulls = skopeoCopies(CLIENTS, true)
    await waitFor(async () => (await tmpFiles(dataDir)).length > 0, { timeoutMs: 30_000, intervalMs: 20, what: 'a partial fill under <dataDir>/tmp' })
    await new Promise(res => setTimeout(res, 300))
    const partialBefore = await tmpFiles(dataDir)
    const code = await must(daemon, 'daemon').kill()
    expect(code, 'exit status after SIGKILL').toBe(137)
    const first = await pulls
    const completeAtKill = (await verifyDataDirBlobs(dataDir)).filter(dg => image.blobs.some(b => b.digest === dg && b.size > 1 << 20))
    console.log(`crash: killed with ${partialBefore.length} file(s) in tmp/, ${completeAtKill.length}/${LAYERS} layers complete; ` +
      `skopeo exit codes ${first.map(f => f.result.code).join(',')}`)
    expect(completeAtKill.length, 'the kill should land mid-fill (not every layer stored yet)').toBeLessThan(LAYERS)
    for (const f of first) await rm(f.dir, { recursive: true, force: true })

    // 2. Restart on the same data dir and port.
    await new Promise(res => setTimeout(res, 300))
    const upMark = await logBarrier(r)
    daemon = await restartDaemon(must(daemon, 'daemon'), must(opts, 'options'))
    expect(await tmpFiles(dataDir), 'files left in <dataDir>/tmp after start-up').toEqual([])
    await verifyDataDirBlobs(dataDir)

    // 3. Pull again, concurrently, and verify every copy.
    const { value: second, ms } = await timed(async () => await skopeoCopies(CLIENTS, false))
    console.log(`crash: ${CLIENTS} concurrent skopeo pulls after restart (throttled upstream, ${(image.totalBytes / 1048576).toFixed(0)} MiB): ${ms} ms`)
    for (const s of second) {
      await verifyOciLayout(join(s.dir, 'img'), image)
      await rm(s.dir, { recursive: true, force: true })
    }
    await logBarrier(r)
    const gets = blobGets(parseRegistryAccess(r.logs().slice(upMark)))
    for (const b of image.blobs) {
      expect(gets.get(b.digest) ?? 0, `upstream GETs of ${b.digest} after restart (fills are shared)`).toBeLessThanOrEqual(1)
    }

    // 4. containerd through the restarted mirror gets the same bytes.
    ctrd = await startContainerd()
    closers.push(async () => { await ctrd?.stop() })
    const p = must(proxy, 'proxy')
    const hostsDir = await writeHostsToml({ upstreamHost: p.host, mirrorUrl: must(daemon, 'daemon').url, hostsDir: join(work, 'certs.d') })
    await ctrd.pull(`${p.host}/library/big:1`, { hostsDir })
    const inStore = new Set(await ctrd.verifyContentStore())
    expect(allDigests(image).filter(dg => !inStore.has(dg)), 'missing from containerd content store').toEqual([])

    // 5. The store holds every blob of the image, each hashing to its name; a clean stop leaves tmp/ empty.
    const stored = new Set(await verifyDataDirBlobs(dataDir))
    expect(image.blobs.filter(b => !stored.has(b.digest)).map(b => b.digest), 'blobs missing from <dataDir>/blobs').toEqual([])
    expect(await must(daemon, 'daemon').stop(), 'exit code after SIGTERM').toBe(0)
    expect(await tmpFiles(dataDir), 'files left in <dataDir>/tmp after a clean stop').toEqual([])
  }, 180_000)
})
