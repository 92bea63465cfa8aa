// End-to-end pulls with real clients (skopeo, containerd) through the pullmesh
// daemon, with the real distribution registry as the upstream. Checks the
// bytes the clients got, which side served them (mirror request log and
// upstream access log), the warm path, and an upstream outage.
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { startContainerd, writeHostsToml, type Containerd } from '../helpers/containerd.js'
import { startDaemon, type DaemonProcess, type RequestLog } from '../helpers/daemon-process.js'
import { startRegistry, type RegistryProcess } from '../helpers/registry.js'
import { requireBinaries, requireRoot, run, timed } from '../helpers/exec.js'
import { allDigests, buildImage, buildMultiArchImage, pushImage, verifySkopeoDir, type BuiltImage } from '../helpers/images.js'
import { blobGets, logBarrier, parseRegistryAccess, upstreamAlias, type AccessEntry } from './support.js'

const LAYER_BYTES = 1 << 20 // 1 MiB random per layer: a few MiB per image

interface Seeded { repo: string, tag: string, img: BuiltImage }

let work = ''
let reg: RegistryProcess | undefined
let daemon: DaemonProcess | undefined
let ctrd: Containerd | undefined
let hostsDir = ''
const closers: Array<() => Promise<void>> = []
const times: Array<[string, number, number]> = [] // label, ms, bytes

// Images: one pair for skopeo and a separate pair for ctr, so each client gets a cold pull.
const seeded: Record<'single' | 'multi' | 'ctrSingle' | 'ctrMulti', Seeded> = {} as never

function must<T> (v: T | undefined, what: string): T {
  if (v === undefined) throw new Error(`${what} was not started (see beforeAll failure)`)
  return v
}

async function upstreamSince (mark: number): Promise<AccessEntry[]> {
  const r = must(reg, 'registry')
  await logBarrier(r)
  return parseRegistryAccess(r.logs().slice(mark))
}

/** The mirror's request count once every request answered so far is in its log. */
async function requestMark (): Promise<number> {
  const d = must(daemon, 'daemon')
  await logBarrier({ url: d.url, logs: d.logs })
  return d.requests().length
}

async function requestsSince (d: DaemonProcess, mark: number): Promise<RequestLog[]> {
  await logBarrier({ url: d.url, logs: d.logs })
  return d.requests().slice(mark)
}

function pathOf (url: string): string {
  const q = url.indexOf('?')
  return q < 0 ? url : url.slice(0, q)
}

/** Assert the mirror answered 200 to a GET of every blob and every manifest of `s` (by digest, or the top one by tag). */
function expectMirrorServed (reqs: RequestLog[], s: Seeded, o: { allManifests: boolean, ns?: string }): void {
  const ok = reqs.filter(r => r.statusCode === 200)
  const got = (suffix: string, methods = ['GET']): boolean =>
    ok.some(r => methods.includes(r.method) && pathOf(r.url).endsWith(suffix))
  const problems: string[] = []
  for (const b of s.img.blobs) {
    if (!got(`/blobs/${b.digest}`)) problems.push(`no 200 GET of blob ${b.digest}`)
  }
  const manifests = o.allManifests ? s.img.manifests : s.img.manifests.slice(0, 1)
  manifests.forEach((m, i) => {
    const byDigest = got(`/manifests/${m.digest}`)
    const byTag = i === 0 && got(`/library/${s.repo}/manifests/${s.tag}`)
    if (!byDigest && !byTag) problems.push(`no 200 GET of manifest ${m.digest}`)
  })
  if (o.ns !== undefined) {
    const withNs = reqs.filter(r => r.url.includes(`ns=${encodeURIComponent(o.ns ?? '')}`))
    if (withNs.length === 0) problems.push(`no request carried ns=${o.ns}`)
  }
  if (problems.length > 0) {
    const shown = reqs.map(r => `${r.method} ${r.url} ${r.statusCode}`).join('\n    ')
    throw new Error(`the mirror request log lacks 200 answers for ${s.repo}:${s.tag} (served elsewhere, or served but not logged):\n  ${problems.join('\n  ')}\n  mirror requests:\n    ${shown}`)
  }
}

/** No client request reached the upstream directly (containerd falls back silently). */
function expectNoClientAtUpstream (entries: AccessEntry[]): void {
  const direct = entries.filter(e => /containerd|skopeo|containers\//i.test(e.userAgent))
  expect(direct.map(e => `${e.method} ${e.path} ${e.status} (${e.userAgent})`), 'client requests that reached the upstream directly').toEqual([])
}

async function skopeoPull (s: Seeded, label: string, o: { ref?: string } = {}): Promise<void> {
  const d = must(daemon, 'daemon')
  const r = must(reg, 'registry')
  const out = await mkdtemp(join(work, 'skopeo-'))
  const all = s.img.manifests.length > 1
  const src = `docker://${d.host}/${upstreamAlias(r.port)}/library/${s.repo}${o.ref ?? ':' + s.tag}`
  const args = ['copy', '--quiet', '--src-tls-verify=false', ...(all ? ['--all'] : []), src, `dir:${join(out, 'img')}`]
  const { ms } = await timed(async () => await run('skopeo', args, { timeoutMs: 120_000 }))
  times.push([label, ms, s.img.totalBytes])
  await verifySkopeoDir(join(out, 'img'), s.img)
  await rm(out, { recursive: true, force: true })
}

async function ctrPull (s: Seeded, label: string): Promise<void> {
  const c = must(ctrd, 'containerd')
  const r = must(reg, 'registry')
  const all = s.img.manifests.length > 1
  const { ms } = await timed(async () => await c.pull(`${r.host}/library/${s.repo}:${s.tag}`, { hostsDir, allPlatforms: all }))
  times.push([label, ms, s.img.totalBytes])
  const got = new Set(await c.verifyContentStore())
  const missing = allDigests(s.img).filter(d => !got.has(d))
  expect(missing, `blobs missing from containerd's content store after pulling ${s.repo}`).toEqual([])
}

describe('e2e: real clients through pullmesh, distribution registry upstream', () => {
  beforeAll(async () => {
    requireRoot()
    requireBinaries('docker-registry', 'skopeo', 'containerd', 'ctr', 'umount')
    work = await mkdtemp(join(tmpdir(), 'pullmesh-e2e-'))
    closers.push(async () => { await rm(work, { recursive: true, force: true }) })
    reg = await startRegistry()
    closers.push(async () => { await reg?.close() })

    const [single, multi, ctrSingle, ctrMulti] = await Promise.all([
      buildImage({ layers: 3, layerBytes: LAYER_BYTES, dir: work }),
      buildMultiArchImage({ platforms: ['amd64', 'arm64'], layers: 2, layerBytes: LAYER_BYTES, dir: work }),
      buildImage({ layers: 3, layerBytes: LAYER_BYTES, dir: work }),
      buildMultiArchImage({ platforms: ['amd64', 'arm64'], layers: 2, layerBytes: LAYER_BYTES, dir: work }),
    ])
    seeded.single = { repo: 'test', tag: '1', img: single }
    seeded.multi = { repo: 'multi', tag: '1', img: multi }
    seeded.ctrSingle = { repo: 'ctr-test', tag: '1', img: ctrSingle }
    seeded.ctrMulti = { repo: 'ctr-multi', tag: '1', img: ctrMulti }
    for (const s of Object.values(seeded)) {
      await pushImage(s.img.layoutDir, `${reg.host}/library/${s.repo}:${s.tag}`, { all: s.img.manifests.length > 1 })
    }

    daemon = await startDaemon({ dataDir: join(work, 'data'), upstreams: { [reg.host]: reg.url, [upstreamAlias(reg.port)]: reg.url }, tagTtl: '1s' })
    closers.push(async () => { await daemon?.stop() })
    ctrd = await startContainerd()
    closers.push(async () => { await ctrd?.stop() })
    hostsDir = await writeHostsToml({ upstreamHost: reg.host, mirrorUrl: daemon.url, hostsDir: join(work, 'certs.d') })
  }, 180_000)

  afterAll(async () => {
    const errors: unknown[] = []
    for (const close of closers.reverse()) {
      try { await close() } catch (e) { errors.push(e) }
    }
    if (times.length > 0) {
      console.log('pull wall times (pullmesh e2e):\n' + times.map(([l, ms, b]) =>
        `  ${l.padEnd(44)} ${String(ms).padStart(6)} ms  ${(b / 1048576).toFixed(1)} MiB`).join('\n'))
    }
    if (errors.length > 0) throw new AggregateError(errors, 'e2e cleanup failed')
  }, 60_000)

  it('skopeo pulls a single-arch image and a multi-arch index through the mirror (cold), fetching each blob upstream at most once', async () => {
    const d = must(daemon, 'daemon')
    const r = must(reg, 'registry')
    const upMark = await logBarrier(r)
    const reqMark = await requestMark()

    await skopeoPull(seeded.single, 'skopeo single-arch cold')
    expectMirrorServed((await requestsSince(d, reqMark)), seeded.single, { allManifests: true })
    const mark2 = await requestMark()
    await skopeoPull(seeded.multi, 'skopeo multi-arch --all cold')
    expectMirrorServed((await requestsSince(d, mark2)), seeded.multi, { allManifests: true })

    const up = await upstreamSince(upMark)
    expectNoClientAtUpstream(up)
    expectEachBlobFetchedAtMostOnce(up, [seeded.single, seeded.multi])
  }, 120_000)

  /** The daemon shares one upstream fill per digest: no blob of these images was fetched twice. */
  function expectEachBlobFetchedAtMostOnce (up: Parameters<typeof blobGets>[0], images: Array<{ img: { blobs: Array<{ digest: string }> } }>): void {
    const gets = blobGets(up)
    for (const s of images) {
      for (const b of s.img.blobs) {
        expect(gets.get(b.digest) ?? 0, `upstream GETs of ${b.digest}`).toBeLessThanOrEqual(1)
      }
    }
  }

  it('containerd pulls both images through a hosts.toml mirror (cold); the mirror serves everything with ns=', async () => {
    const d = must(daemon, 'daemon')
    const r = must(reg, 'registry')
    const upMark = await logBarrier(r)
    for (const [s, label] of [[seeded.ctrSingle, 'ctr single-arch cold'], [seeded.ctrMulti, 'ctr multi-arch --all-platforms cold']] as const) {
      const reqMark = await requestMark()
      await ctrPull(s, label)
      expectMirrorServed((await requestsSince(d, reqMark)), s, { allManifests: true, ns: r.host })
    }
    const up = await upstreamSince(upMark)
    expectNoClientAtUpstream(up)
    expectEachBlobFetchedAtMostOnce(up, [seeded.ctrSingle, seeded.ctrMulti])
  }, 120_000)

  it('a second pull is served from the cache: no blob GETs reach the upstream', async () => {
    const d = must(daemon, 'daemon')
    const r = must(reg, 'registry')
    const c = must(ctrd, 'containerd')
    const upMark = await logBarrier(r)
    const reqMark = await requestMark()
    await skopeoPull(seeded.single, 'skopeo single-arch warm')
    await skopeoPull(seeded.multi, 'skopeo multi-arch --all warm')
    await c.clear()
    await ctrPull(seeded.ctrSingle, 'ctr single-arch warm')
    await ctrPull(seeded.ctrMulti, 'ctr multi-arch --all-platforms warm')
    const reqs = (await requestsSince(d, reqMark))
    for (const s of Object.values(seeded)) expectMirrorServed(reqs, s, { allManifests: true })
    const up = await upstreamSince(upMark)
    expectNoClientAtUpstream(up)
    expect([...blobGets(up).keys()], 'blob GETs at the upstream during warm pulls').toEqual([])
  }, 120_000)

  it('upstream outage: cached tags (past their TTL) and digests still pull with skopeo and ctr', async () => {
    const d = must(daemon, 'daemon')
    const r = must(reg, 'registry')
    const c = must(ctrd, 'containerd')
    await new Promise(res => setTimeout(res, 1500)) // --tag-ttl 1s has passed: tags must be answered stale-if-error
    await r.stop()
    try {
      const reqMark = await requestMark()
      await skopeoPull(seeded.single, 'skopeo single-arch, upstream down')
      await skopeoPull(seeded.single, 'skopeo single-arch by digest, upstream down', { ref: '@' + seeded.single.img.manifestDigest })
      await skopeoPull(seeded.multi, 'skopeo multi-arch --all, upstream down')
      await c.clear()
      await ctrPull(seeded.ctrSingle, 'ctr single-arch, upstream down')
      await ctrPull(seeded.ctrMulti, 'ctr multi-arch --all-platforms, upstream down')
      const reqs = (await requestsSince(d, reqMark))
      for (const s of Object.values(seeded)) expectMirrorServed(reqs, s, { allManifests: true })
      const failed = reqs.filter(q => q.statusCode >= 500)
      expect(failed.map(q => `${q.method} ${q.url} ${q.statusCode}`), '5xx answers during the outage').toEqual([])
    } finally {
      await r.start()
    }
  }, 120_000)

  it('baseline: the same pulls straight from the registry (for comparison only)', async () => {
    const r = must(reg, 'registry')
    const c = must(ctrd, 'containerd')
    for (const s of [seeded.single, seeded.multi]) {
      const out = await mkdtemp(join(work, 'direct-'))
      const all = s.img.manifests.length > 1
      const { ms } = await timed(async () => await run('skopeo', ['copy', '--quiet', '--src-tls-verify=false', ...(all ? ['--all'] : []),
        `docker://${r.host}/library/${s.repo}:${s.tag}`, `dir:${join(out, 'img')}`]))
      times.push([`skopeo ${all ? 'multi-arch --all' : 'single-arch'} direct from registry`, ms, s.img.totalBytes])
      await verifySkopeoDir(join(out, 'img'), s.img)
      await rm(out, { recursive: true, force: true })
    }
    await c.clear()
    for (const s of [seeded.ctrSingle, seeded.ctrMulti]) {
      const all = s.img.manifests.length > 1
      const { ms } = await timed(async () => await c.pull(`${r.host}/library/${s.repo}:${s.tag}`, { allPlatforms: all }))
      times.push([`ctr ${all ? 'multi-arch --all-platforms' : 'single-arch'} direct from registry`, ms, s.img.totalBytes])
    }
  }, 120_000)
})
