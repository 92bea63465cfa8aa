// The side-by-side scenarios: pullmesh against the CNCF distribution registry in proxy mode, both in
// front of the same upstream (a plain distribution registry), alternating run by run.
import { access, mkdtemp, mkdir, rm, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import type { BuiltImage } from '../helpers/images.js'
import { run } from '../helpers/exec.js'
import { curlDownload, curlHerd, memOf, sampleRss, wrk } from './lib/load.js'
import {
  httpStatus, metricValue, settleAccessLog, startDistribution, startPassthrough, startPullmesh, upstreamBlobTraffic,
  UPSTREAM_NAME, type Distribution, type Pullmesh,
} from './lib/procs.js'
import { absAtMost, best, diffAtMost, exactly, median, notRun, ratioAtLeast, ratioAtMost, row, type Row } from './lib/report.js'
import { seedDistributionStorage, seedPullmeshIndex, smallBlobs, type SeededBlob } from './lib/seed.js'

export interface Sizes {
  big: number
  herd: number
  herdClients: number
  memClients: number
  layers: number
  layerBytes: number
  indexBlobs: number
  wrkSeconds: number
  wrkConnections: number
  /** Scenario 9: nodes in the mesh herd, and the blob they all pull at once. */
  meshNodes: number
  meshHerd: number
  /** Scenario 2: a blob of a common layer's size, filled cold in the process that just filled the big one. */
  mid: number
  /** Scenario 11: payload bytes of each layer of the realistic image (amd64; the index also names a small arm64 image). */
  mixLayers: number[]
}

/** The realistic image of scenario 11, pushed to the upstream as `repo:tag` (a multi-arch index). */
export interface MixImage {
  image: BuiltImage
  repo: string
  /** The amd64 image skopeo pulls: its manifest, config and layers (in manifest order). */
  platform: BuiltImage['platforms'][number]
}

export interface Ctx {
  smoke: boolean
  runs: number
  scratch: string
  sizes: Sizes
  log: (msg: string) => void
  upstream: Distribution
  big: SeededBlob
  herd: SeededBlob
  image: BuiltImage
  imageRepo: string
  /** Scenario 2's mid-size blob (`sizes.mid`). */
  mid?: SeededBlob
  /** Scenario 11's image; built only when the scenario runs. */
  mix?: MixImage
}

const ACCEPT = 'Accept: application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, ' +
  'application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json'

type Who = 'pullmesh' | 'distribution'
const order = (i: number): Who[] => i % 2 === 0 ? ['pullmesh', 'distribution'] : ['distribution', 'pullmesh']

interface Inst {
  who: Who
  url: string
  pid: number
  blobUrl: (b: SeededBlob) => string
  repoPath: (repo: string) => string
  /** Where the cache keeps a committed copy of the blob. */
  blobFile: (b: SeededBlob) => string
  close: () => Promise<void>
}

const hexOf = (b: SeededBlob): string => b.digest.slice('sha256:'.length)

/**
 * Waits until the cache has committed the blob to its storage, then until the upstream's access log
 * is quiet. distribution 2.8 stores a proxied blob with a second, separate upstream GET that can end
 * well after the client's download; stopping the proxy before that would hide its bytes.
 */
async function waitCommitted (ctx: Ctx, inst: Inst, b: SeededBlob, maxMs = 120_000): Promise<void> {
  const end = Date.now() + maxMs
  const f = inst.blobFile(b)
  for (;;) {
    try { await access(f); break } catch {}
    if (Date.now() > end) throw new Error(`${inst.who} did not commit ${b.digest} within ${maxMs} ms (${f})`)
    await new Promise(resolve => setTimeout(resolve, 100))
  }
  await settleAccessLog(ctx.upstream, 1000)
}

async function fresh (ctx: Ctx, who: Who, o: { dataDir?: string, nodeArgs?: string[] } = {}): Promise<Inst & { pm?: Pullmesh, dist?: Distribution }> {
  if (who === 'pullmesh') {
    const dataDir = o.dataDir ?? await mkdtemp(join(ctx.scratch, 'pm-'))
    const pm = await startPullmesh({ dataDir, upstream: ctx.upstream.url, ...(o.nodeArgs !== undefined ? { nodeArgs: o.nodeArgs } : {}) })
    return {
      who, pm, url: pm.url, pid: pm.pid,
      repoPath: repo => `${UPSTREAM_NAME}/${repo}`,
      blobUrl: b => `${pm.url}/v2/${UPSTREAM_NAME}/${b.repo}/blobs/${b.digest}`,
      blobFile: b => join(dataDir, 'blobs', 'sha256', hexOf(b).slice(0, 2), hexOf(b)),
      close: async () => { await pm.stop(); if (o.dataDir === undefined) await rm(dataDir, { recursive: true, force: true }) },
    }
  }
  const dir = o.dataDir ?? await mkdtemp(join(ctx.scratch, 'dist-'))
  const dist = await startDistribution({ dir, proxy: ctx.upstream.url })
  return {
    who, dist, url: dist.url, pid: dist.pid,
    repoPath: repo => repo,
    blobUrl: b => `${dist.url}/v2/${b.repo}/blobs/${b.digest}`,
    blobFile: b => join(dist.root, 'docker', 'registry', 'v2', 'blobs', 'sha256', hexOf(b).slice(0, 2), hexOf(b), 'data'),
    close: async () => { await dist.stop(); if (o.dataDir === undefined) await rm(dir, { recursive: true, force: true }) },
  }
}

type Samples = Record<Who, number[]>
const samples = (): Samples => ({ pullmesh: [], distribution: [] })

// ------------------------------------------------------------------ 1 + 2: cold miss, then warm hit

export async function blobColdWarm (ctx: Ctx): Promise<Row[]> {
  const b = ctx.big
  const ttfb = samples(); const bps = samples(); const upBytes = samples(); const upGets = samples()
  const warmBps = samples(); const midMs = samples()
  const mid = ctx.mid
  const passBps: number[] = []
  const kept: Partial<Record<Who, Inst>> = {}
  const pass = await startPassthrough(ctx.upstream.url)
  try {
    for (let i = 0; i < ctx.runs; i++) {
      const p = await curlDownload(`${pass.url}/v2/${b.repo}/blobs/${b.digest}`, { expectBytes: b.size })
      passBps.push(p.bps)
      ctx.log(`  cold pass-through reference #${i + 1}: ${(p.bps / 2 ** 30).toFixed(2)} GiB/s`)
      for (const who of order(i)) {
        const inst = await fresh(ctx, who)
        try {
          const from = ctx.upstream.access.length
          const d = await curlDownload(inst.blobUrl(b), { expectBytes: b.size })
          await waitCommitted(ctx, inst, b)
          const t = upstreamBlobTraffic(ctx.upstream, b.digest, from)
          ttfb[who].push(d.ttfb); bps[who].push(d.bps); upBytes[who].push(t.bytes / b.size); upGets[who].push(t.gets)
          ctx.log(`  cold ${who} #${i + 1}: ttfb ${(d.ttfb * 1000).toFixed(1)} ms, ${(d.bps / 2 ** 30).toFixed(2)} GiB/s, upstream ${t.gets} GETs = ${(t.bytes / b.size).toFixed(2)}× blob`)
          if (mid !== undefined) {
            // The same (now warm) process fills a blob of a common layer's size: per-fill cost plus per-byte cost.
            const m = await curlDownload(inst.blobUrl(mid), { expectBytes: mid.size })
            await waitCommitted(ctx, inst, mid)
            midMs[who].push(m.total)
            ctx.log(`  cold ${fmtSize(mid.size)} ${who} #${i + 1}: ${(m.total * 1000).toFixed(0)} ms, ttfb ${(m.ttfb * 1000).toFixed(1)} ms`)
          }
        } finally {
          if (i === ctx.runs - 1) kept[who] = inst
          else await inst.close()
        }
      }
    }
    // Warm: the instances of the last cold run hold the blob.
    const from = ctx.upstream.access.length
    for (const who of ['pullmesh', 'distribution'] as const) await curlDownload(kept[who]!.blobUrl(b), { expectBytes: b.size }) // page cache, commit
    for (let i = 0; i < ctx.runs; i++) {
      for (const who of order(i)) {
        const d = await curlDownload(kept[who]!.blobUrl(b), { expectBytes: b.size })
        warmBps[who].push(d.bps)
        ctx.log(`  warm ${who} #${i + 1}: ${(d.bps / 2 ** 30).toFixed(2)} GiB/s`)
      }
    }
    const warmUp = upstreamBlobTraffic(ctx.upstream, b.digest, from)
    const size = `${fmtSize(b.size)} blob`
    return [
      row('1 warm hit', `throughput, ${size}`, 'B/s', 'higher', warmBps.pullmesh, warmBps.distribution, ratioAtLeast(1),
        warmUp.gets > 0 ? `upstream saw ${warmUp.gets} GETs during warm runs` : undefined),
      row('2 cold miss', 'time to first byte (fresh process)', 's', 'lower', ttfb.pullmesh, ttfb.distribution, diffAtMost(0.005, '≤ dist + 5 ms')),
      row('2 cold miss', `throughput, ${size}`, 'B/s', 'higher', bps.pullmesh, bps.distribution, ratioAtLeast(0.8)),
      ...(mid !== undefined
        ? [row('2 cold miss', `total time, ${fmtSize(mid.size)} blob (warm process)`, 's', 'lower', midMs.pullmesh, midMs.distribution, ratioAtMost(1))]
        : []),
      row('2 cold miss', 'reference, not pullmesh: a bare Node.js pass-through (undici → http, no hash, no disk, no cache), throughput',
        'B/s', 'higher', passBps, bps.distribution, undefined, 'test/bench/lib/passthrough.mjs; the floor of the Node.js stream path here'),
      row('2 cold miss', 'upstream bytes ÷ blob size', 'x', 'lower', upBytes.pullmesh, upBytes.distribution, exactly(1, '= 1.0× blob'),
        `upstream GETs: ${upGets.pullmesh.join('/')} vs ${upGets.distribution.join('/')}`),
    ]
  } finally {
    await Promise.allSettled([...Object.values(kept).map(async k => await k.close()), pass.stop()])
  }
}

function fmtSize (n: number): string {
  if (n >= 2 ** 30) return `${n / 2 ** 30} GiB`
  if (n >= 2 ** 20) return `${+(n / 2 ** 20).toFixed(1)} MiB`
  return n >= 1024 ? `${+(n / 1024).toFixed(1)} KiB` : `${n} B`
}

// ------------------------------------------------------------------ 3: herd

export async function herd (ctx: Ctx): Promise<Row[]> {
  const b = ctx.herd
  const n = ctx.sizes.herdClients
  const wall = samples(); const upBytes = samples(); const perClient = samples()
  for (let i = 0; i < ctx.runs; i++) {
    for (const who of order(i)) {
      const inst = await fresh(ctx, who)
      try {
        const from = ctx.upstream.access.length
        const r = await curlHerd(inst.blobUrl(b), n, { expectBytes: b.size })
        await waitCommitted(ctx, inst, b)
        const t = upstreamBlobTraffic(ctx.upstream, b.digest, from)
        wall[who].push(r.wall); upBytes[who].push(t.bytes / b.size)
        perClient[who].push(...r.each.map(d => d.bps))
        ctx.log(`  herd ${who} #${i + 1}: all ${n} done in ${r.wall.toFixed(2)} s, upstream ${t.gets} GETs = ${(t.bytes / b.size).toFixed(2)}× blob`)
      } finally { await inst.close() }
    }
  }
  const label = `${n} clients × ${fmtSize(b.size)}`
  return [
    row('3 herd', `total time, ${label}`, 's', 'lower', wall.pullmesh, wall.distribution, best()),
    row('3 herd', 'upstream bytes ÷ blob size', 'x', 'lower', upBytes.pullmesh, upBytes.distribution, exactly(1, '= 1.0× blob')),
    row('3 herd', 'per-client throughput (median over clients)', 'B/s', 'higher', perClient.pullmesh, perClient.distribution),
  ]
}

// ------------------------------------------------------------------ 4: small requests (wrk)

export async function smallRequests (ctx: Ctx): Promise<Row[]> {
  const insts = { pullmesh: await fresh(ctx, 'pullmesh'), distribution: await fresh(ctx, 'distribution') }
  try {
    const digest = ctx.image.manifestDigest
    const paths = (inst: Inst): Record<string, string> => ({
      digest: `${inst.url}/v2/${inst.repoPath(ctx.imageRepo)}/manifests/${digest}`,
      tag: `${inst.url}/v2/${inst.repoPath(ctx.imageRepo)}/manifests/${ctx.image.tag}`,
    })
    // Warm both caches (and the tag mapping, well inside pullmesh's 5 min TTL).
    for (const inst of Object.values(insts)) {
      for (const url of Object.values(paths(inst))) await curlDownload(url, { headers: [ACCEPT] })
    }
    const rows: Row[] = []
    for (const method of ['HEAD', 'GET'] as const) {
      for (const by of ['digest', 'tag'] as const) {
        const rps = samples(); const p99 = samples(); const upstreamPerReq = samples(); const bad: string[] = []
        for (let i = 0; i < ctx.runs; i++) {
          for (const who of order(i)) {
            const from = ctx.upstream.access.length
            const r = await wrk(paths(insts[who])[by]!, { method, durationS: ctx.sizes.wrkSeconds, connections: ctx.sizes.wrkConnections, headers: [ACCEPT] })
            await new Promise(resolve => setTimeout(resolve, 200))
            const upReqs = ctx.upstream.access.length - from
            upstreamPerReq[who].push(upReqs / Math.max(1, r.requests))
            if (r.non2xx > 0 || r.errors > 0) bad.push(`${who}: ${r.non2xx} non-2xx, ${r.errors} socket errors`)
            rps[who].push(r.rps); p99[who].push(r.p99ms)
            ctx.log(`  ${method === 'HEAD' ? 'head-load' : 'wrk'} ${method} by ${by} ${who} #${i + 1}: ${r.rps.toFixed(0)} rps, p99 ${r.p99ms.toFixed(2)} ms, ${upReqs} upstream requests${r.non2xx > 0 ? `, ${r.non2xx} non-2xx` : ''}${r.errors > 0 ? `, ${r.errors} socket errors` : ''}`)
          }
        }
        const upNote = `upstream requests per client request: ${(median(upstreamPerReq.pullmesh) ?? 0).toFixed(3)} vs ${(median(upstreamPerReq.distribution) ?? 0).toFixed(3)}`
        const note = [...bad, ...(method === 'HEAD' ? ['load from head-load.mjs (wrk 4.1 stalls on HEAD)'] : []), upNote].join('; ')
        rows.push(row('4 small requests', `${method} manifest by ${by}: requests/s`, 'rps', 'higher', rps.pullmesh, rps.distribution, ratioAtLeast(1), note))
        rows.push(row('4 small requests', `${method} manifest by ${by}: p99 latency`, 'ms', 'lower', p99.pullmesh, p99.distribution))
        if (bad.length > 0) { rows.at(-2)!.met = false }
      }
    }
    return rows
  } finally {
    await Promise.allSettled(Object.values(insts).map(async i => await i.close()))
  }
}

// ------------------------------------------------------------------ 5: skopeo pulls

/** `skopeo copy` of `repo:tag` from an instance into a `dir:` (deleted after), in seconds. */
async function skopeoCopier (ctx: Ctx): Promise<{ copy: (inst: Inst, repo: string, tag: string, out: string) => Promise<number>, cleanup: () => Promise<void> }> {
  const conf = join(ctx.scratch, 'registries.conf')
  await writeFile(conf, 'unqualified-search-registries = []\n')
  const home = await mkdtemp(join(ctx.scratch, 'skopeo-home-'))
  return {
    copy: async (inst, repo, tag, out) => {
      const src = `docker://${new URL(inst.url).host}/${inst.repoPath(repo)}:${tag}`
      const r = await run('skopeo', ['--registries-conf', conf, 'copy', '--quiet', '--src-tls-verify=false', src, `dir:${out}`],
        { timeoutMs: 300_000, env: { ...process.env, HOME: home, TMPDIR: ctx.scratch } })
      await rm(out, { recursive: true, force: true })
      return r.ms / 1000
    },
    cleanup: async () => { await rm(home, { recursive: true, force: true }) },
  }
}

export async function skopeoPulls (ctx: Ctx): Promise<Row[]> {
  const cold = samples(); const warm = samples()
  const sk = await skopeoCopier(ctx)
  const copy = async (inst: Inst, out: string): Promise<number> => await sk.copy(inst, ctx.imageRepo, ctx.image.tag, out)
  try {
    for (let i = 0; i < ctx.runs; i++) {
      for (const who of order(i)) {
        const inst = await fresh(ctx, who)
        try {
          const c = await copy(inst, join(ctx.scratch, `skopeo-out-${who}-${i}-cold`))
          const w = await copy(inst, join(ctx.scratch, `skopeo-out-${who}-${i}-warm`))
          cold[who].push(c); warm[who].push(w)
          ctx.log(`  skopeo ${who} #${i + 1}: cold ${c.toFixed(2)} s, warm ${w.toFixed(2)} s`)
        } finally { await inst.close() }
      }
    }
  } finally {
    await sk.cleanup()
  }
  const label = `${ctx.sizes.layers} layers × ${fmtSize(ctx.sizes.layerBytes)}`
  return [
    row('5 skopeo copy', `cold pull wall time, ${label}`, 's', 'lower', cold.pullmesh, cold.distribution, ratioAtMost(0.9)),
    row('5 skopeo copy', 'warm pull wall time', 's', 'lower', warm.pullmesh, warm.distribution, ratioAtMost(1)),
  ]
}

// ------------------------------------------------------------------ 11: a realistic image mix

/**
 * An image shaped like a common base image (a dozen layers from 1 KB to 150 MB, a config, a two-platform
 * index), pulled cold and warm with skopeo through each cache. Then, on another fresh instance, a client
 * that fetches what skopeo fetches, in the order it does (`dir:` copies one blob at a time: the index, the
 * amd64 manifest, the layers in manifest order, then the config), records each blob's time to first byte.
 */
export async function realisticMix (ctx: Ctx): Promise<Row[]> {
  const mix = ctx.mix
  if (mix === undefined) throw new Error('the realistic image was not built')
  const p = mix.platform
  const tag = mix.image.tag
  const cold = samples(); const warm = samples()
  const blobs = [...p.layers, p.config]
  const ttfb = blobs.map(() => samples())
  const fetchAll = samples(); const ttfbSumCold = samples(); const ttfbSumWarm = samples()
  const sk = await skopeoCopier(ctx)
  try {
    for (let i = 0; i < ctx.runs; i++) {
      for (const who of order(i)) {
        const inst = await fresh(ctx, who)
        try {
          const c = await sk.copy(inst, mix.repo, tag, join(ctx.scratch, `mix-out-${who}-${i}-cold`))
          const w = await sk.copy(inst, mix.repo, tag, join(ctx.scratch, `mix-out-${who}-${i}-warm`))
          cold[who].push(c); warm[who].push(w)
          ctx.log(`  mix skopeo ${who} #${i + 1}: cold ${c.toFixed(2)} s, warm ${w.toFixed(2)} s`)
        } finally { await inst.close() }
      }
      for (const who of order(i)) {
        const inst = await fresh(ctx, who)
        try {
          const base = `${inst.url}/v2/${inst.repoPath(mix.repo)}`
          const pass = async (): Promise<{ each: number[], wall: number }> => {
            const t0 = performance.now()
            await curlDownload(`${base}/manifests/${tag}`, { headers: [ACCEPT] })
            await curlDownload(`${base}/manifests/${p.manifest.digest}`, { headers: [ACCEPT] })
            const each: number[] = []
            for (const b of blobs) each.push((await curlDownload(`${base}/blobs/${b.digest}`, { expectBytes: b.size })).ttfb)
            return { each, wall: (performance.now() - t0) / 1000 }
          }
          const c = await pass()
          c.each.forEach((t, k) => ttfb[k]![who].push(t))
          fetchAll[who].push(c.wall)
          ttfbSumCold[who].push(c.each.reduce((a, b) => a + b, 0))
          const w = await pass()
          ttfbSumWarm[who].push(w.each.reduce((a, b) => a + b, 0))
          ctx.log(`  mix client ${who} #${i + 1}: cold ${c.wall.toFixed(2)} s, per-blob ttfb ${c.each.map(t => (t * 1000).toFixed(1)).join(' ')} ms; warm ttfb sum ${(ttfbSumWarm[who].at(-1)! * 1000).toFixed(1)} ms`)
        } finally { await inst.close() }
      }
    }
  } finally {
    await sk.cleanup()
  }
  const totalMiB = (p.config.size + p.manifest.size + p.layers.reduce((a, l) => a + l.size, 0)) / 2 ** 20
  const label = `${p.layers.length} layers, ${fmtSize(Math.min(...p.layers.map(l => l.size)))}–${fmtSize(Math.max(...p.layers.map(l => l.size)))}, ${totalMiB.toFixed(0)} MiB, index + config`
  return [
    row('11 realistic mix', `skopeo cold pull wall time, ${label}`, 's', 'lower', cold.pullmesh, cold.distribution, ratioAtMost(0.9)),
    row('11 realistic mix', 'skopeo warm pull wall time', 's', 'lower', warm.pullmesh, warm.distribution, ratioAtMost(1)),
    row('11 realistic mix', 'client in skopeo\'s order, cold: wall time', 's', 'lower', fetchAll.pullmesh, fetchAll.distribution),
    row('11 realistic mix', 'client, cold: sum of per-blob time to first byte', 's', 'lower', ttfbSumCold.pullmesh, ttfbSumCold.distribution),
    row('11 realistic mix', 'client, warm: sum of per-blob time to first byte', 's', 'lower', ttfbSumWarm.pullmesh, ttfbSumWarm.distribution),
    ...blobs.map((b, k) => row('11 realistic mix', `cold time to first byte, ${k < p.layers.length ? `layer ${k + 1}` : 'config'} (${fmtSize(b.size)})`,
      's', 'lower', ttfb[k]!.pullmesh, ttfb[k]!.distribution, diffAtMost(0.005, '≤ dist + 5 ms'))),
  ]
}

// ------------------------------------------------------------------ 7 + 8: memory and start-up with a big index

export async function memoryAndStartup (ctx: Ctx): Promise<Row[]> {
  const b = ctx.big
  const nIndex = ctx.sizes.indexBlobs
  const blobs = smallBlobs(nIndex, String(process.pid))
  const pmDir = await mkdtemp(join(ctx.scratch, 'pm-index-'))
  const distDir = await mkdtemp(join(ctx.scratch, 'dist-index-'))
  const distRoot = join(distDir, 'data')
  try {
    let t0 = performance.now()
    await seedPullmeshIndex(pmDir, blobs)
    await mkdir(distRoot, { recursive: true })
    await seedDistributionStorage(distRoot, blobs)
    ctx.log(`  seeded ${nIndex} index blobs in ${((performance.now() - t0) / 1000).toFixed(1)} s`)
    // Both caches also hold the big blob (fetched through them once).
    for (const who of ['pullmesh', 'distribution'] as const) {
      const inst = await fresh(ctx, who, { dataDir: who === 'pullmesh' ? pmDir : distDir })
      try {
        await curlDownload(inst.blobUrl(b), { expectBytes: b.size })
        await waitCommitted(ctx, inst, b)
        if (who === 'pullmesh') {
          const m = await (await fetch(`${inst.url}/metrics`)).text()
          ctx.log(`  pullmesh store: ${await metricValue(m, 'pullmesh_store_blobs')} blobs`)
        }
      } finally { await inst.close() }
    }

    const ready = samples(); const idle = samples(); const peak = samples()
    for (let i = 0; i < ctx.runs; i++) {
      for (const who of order(i)) {
        t0 = performance.now()
        const inst = await fresh(ctx, who, { dataDir: who === 'pullmesh' ? pmDir : distDir })
        try {
          const readyMs = inst.pm?.readyMs ?? inst.dist!.readyMs
          ready[who].push(readyMs / 1000)
          await new Promise(resolve => setTimeout(resolve, 500))
          const idleRss = (await memOf(inst.pid)).rss
          idle[who].push(idleRss)
          const sampler = sampleRss(inst.pid, 25)
          let m: { peakRss: number, hwm: number }
          try {
            await curlHerd(inst.blobUrl(b), ctx.sizes.memClients, { expectBytes: b.size })
          } finally { m = await sampler.stop() }
          const p = Math.max(m.peakRss, Number.isFinite(m.hwm) ? m.hwm : 0)
          peak[who].push(p)
          ctx.log(`  ${who} #${i + 1}: ready in ${readyMs.toFixed(0)} ms, idle RSS ${(idleRss / 2 ** 20).toFixed(0)} MiB, peak RSS ${(p / 2 ** 20).toFixed(0)} MiB (sampled ${(m.peakRss / 2 ** 20).toFixed(0)}, VmHWM ${(m.hwm / 2 ** 20).toFixed(0)})`)
        } finally { await inst.close() }
      }
    }
    const idx = `${nIndex.toLocaleString('en')}-blob index`
    return [
      row('7 memory', `peak RSS, ${ctx.sizes.memClients} concurrent ${fmtSize(b.size)} downloads, ${idx}`, 'B', 'lower', peak.pullmesh, peak.distribution, absAtMost(200 * 2 ** 20, '≤ 200 MiB')),
      row('7 memory', `idle RSS after start, ${idx}`, 'B', 'lower', idle.pullmesh, idle.distribution, absAtMost(200 * 2 ** 20, '≤ 200 MiB')),
      row('8 start-up', `time to ready (/readyz 200; distribution: /v2/), ${idx}`, 's', 'lower', ready.pullmesh, ready.distribution, absAtMost(1, '< 1 s')),
    ]
  } finally {
    await rm(pmDir, { recursive: true, force: true })
    await rm(distDir, { recursive: true, force: true })
  }
}

/** For the smoke check: a pullmesh that answers. */
export async function sanity (url: string): Promise<void> {
  const s = await httpStatus(`${url}/v2/`)
  if (s !== 200) throw new Error(`${url}/v2/ answered ${s}`)
}

export { notRun }
