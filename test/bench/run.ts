// pullmesh benchmarks, side by side with the CNCF distribution registry (proxy mode), same upstream,
// same run, alternating. `npm run bench` (full) or `npm run bench -- --smoke` / BENCH_SMOKE=1 (tiny sizes,
// one run each, < ~60 s; exits non-zero if a scenario crashes).
//
//   --runs N           runs per scenario (default 3; smoke 1)
//   --only a,b         scenarios: blob (1+2), herd (3), small (4), skopeo (5), mesh (6), memory (7+8),
//                      meshherd (9), meshscale (10: many in-process mesh nodes; see mesh-scale.ts),
//                      mix (11: a realistic image, 12 layers of 1 KB to 150 MB, pulled with skopeo)
//   --mesh-nodes N     nodes in the mesh herd, 3 to 8 (default 3)
//   --keep-going       (default) a failed scenario is reported and the others still run
//
// Results: test/bench/results/latest.md, latest.json and bench-<time>.json.
import { mkdir, mkdtemp, rm, writeFile, access } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { buildImage, buildMultiArchImage, pushImage } from '../helpers/images.js'
import { which } from '../helpers/exec.js'
import { DAEMON_ENTRY, startDistribution, stopAll } from './lib/procs.js'
import { markdown, notRun, toJson, type Row } from './lib/report.js'
import { seedBlob } from './lib/seed.js'
import { blobColdWarm, herd, memoryAndStartup, realisticMix, skopeoPulls, smallRequests, type Ctx, type MixImage, type Sizes } from './scenarios.js'
import { mesh, meshCleanup } from './mesh.js'
import { meshHerd } from './mesh-herd.js'
import { meshScale } from './mesh-scale.js'

const argv = process.argv.slice(2)
const flag = (name: string): string | undefined => {
  const i = argv.indexOf(name)
  if (i >= 0) return argv[i + 1]
  const eq = argv.find(a => a.startsWith(name + '='))
  return eq?.slice(name.length + 1)
}
const smoke = argv.includes('--smoke') || process.env.BENCH_SMOKE === '1'
const runs = Number(flag('--runs') ?? (smoke ? 1 : 3))
const ALL = ['blob', 'herd', 'small', 'skopeo', 'mix', 'memory', 'mesh', 'meshherd', 'meshscale'] as const
const only = new Set((flag('--only') ?? ALL.join(',')).split(',').map(s => s.trim()))
for (const s of only) if (!(ALL as readonly string[]).includes(s)) { console.error(`unknown scenario ${s}; one of ${ALL.join(', ')}`); process.exit(2) }

const MiB = 2 ** 20
const KB = 1000
const MB = 1000 * 1000
/** Layer payloads shaped like a common base image's (scenario 11); the smoke run's is a tiny mix. */
const MIX_LAYERS = smoke
  ? [1 * KB, 4 * KB, 32 * KB, 200 * KB, 1 * MB]
  : [1 * KB, 4 * KB, 32 * KB, 200 * KB, 1 * MB, 3 * MB, 8 * MB, 16 * MB, 30 * MB, 50 * MB, 80 * MB, 150 * MB]
const meshNodes = Number(flag('--mesh-nodes') ?? 3)
if (!Number.isInteger(meshNodes) || meshNodes < 3 || meshNodes > 8) { console.error('--mesh-nodes: 3 to 8'); process.exit(2) }
const sizes: Sizes = smoke
  ? { big: 8 * MiB, herd: 8 * MiB, herdClients: 10, memClients: 10, layers: 10, layerBytes: 256 * 1024, indexBlobs: 200, wrkSeconds: 1, wrkConnections: 50, meshNodes, meshHerd: 4 * MiB, mid: 2 * MiB, mixLayers: MIX_LAYERS }
  : { big: 1024 * MiB, herd: 256 * MiB, herdClients: 10, memClients: 10, layers: 10, layerBytes: 16 * MiB, indexBlobs: 10_000, wrkSeconds: 5, wrkConnections: 50, meshNodes, meshHerd: 256 * MiB, mid: 64 * MiB, mixLayers: MIX_LAYERS }

const RESULTS = fileURLToPath(new URL('./results/', import.meta.url))
const started = Date.now()
const log = (msg: string): void => { console.log(`[${((Date.now() - started) / 1000).toFixed(1).padStart(6)} s] ${msg}`) }

let scratch: string | undefined
let cleaning: Promise<void> | undefined
async function cleanup (): Promise<void> {
  cleaning ??= (async () => {
    await stopAll()
    await meshCleanup()
    if (scratch !== undefined) await rm(scratch, { recursive: true, force: true })
  })()
  await cleaning
}
for (const sig of ['SIGINT', 'SIGTERM'] as const) {
  process.once(sig, () => { log(`${sig}: cleaning up`); void cleanup().finally(() => process.exit(130)) })
}

async function main (): Promise<number> {
  try { await access(DAEMON_ENTRY) } catch { throw new Error(`${DAEMON_ENTRY} missing: build first (npx tsc -p tsconfig.json)`) }
  for (const bin of ['curl', 'wrk', 'skopeo', '/usr/bin/docker-registry']) {
    if (which(bin) === undefined && !bin.startsWith('/')) throw new Error(`${bin} is not installed`)
  }
  scratch = await mkdtemp(join(tmpdir(), 'pullmesh-bench-'))
  log(`${smoke ? 'SMOKE' : 'FULL'} bench, ${runs} run(s) each, scratch ${scratch}`)

  const upDir = await mkdtemp(join(scratch, 'upstream-'))
  const upstream = await startDistribution({ dir: upDir, accessLog: true })
  log(`upstream distribution at ${upstream.url}`)
  const big = await seedBlob(upstream.url, 'bench/blob', sizes.big)
  const herdBlob = await seedBlob(upstream.url, 'bench/herd', sizes.herd)
  const mid = await seedBlob(upstream.url, 'bench/mid', sizes.mid)
  log(`seeded blobs ${big.digest.slice(0, 19)} (${sizes.big} B), ${herdBlob.digest.slice(0, 19)} (${sizes.herd} B), ${mid.digest.slice(0, 19)} (${sizes.mid} B)`)
  const image = await buildImage({ layers: sizes.layers, layerBytes: sizes.layerBytes, dir: scratch, tag: '1' })
  await pushImage(image.layoutDir, `${upstream.host}/bench/img:1`)
  await image.cleanup()
  log(`pushed bench/img:1 (${sizes.layers} layers, ${(image.totalBytes / MiB).toFixed(1)} MiB)`)

  let mix: MixImage | undefined
  if (only.has('mix')) {
    // A two-platform index: skopeo pulls the amd64 image (the mix); the arm64 one is small.
    const img = await buildMultiArchImage({ dir: scratch, tag: '1', platforms: ['amd64', 'arm64'], platformLayerSizes: { amd64: sizes.mixLayers, arm64: [1 * KB, 4 * KB] } })
    await pushImage(img.layoutDir, `${upstream.host}/bench/mix:1`, { all: true })
    await img.cleanup()
    const platform = img.platforms.find(p => p.arch === 'amd64')!
    mix = { image: img, repo: 'bench/mix', platform }
    log(`pushed bench/mix:1 (index; amd64: ${platform.layers.length} layers, ${(platform.layers.reduce((a, l) => a + l.size, 0) / MiB).toFixed(1)} MiB)`)
  }

  const ctx: Ctx = { smoke, runs, scratch, sizes, log, upstream, big, herd: herdBlob, image, imageRepo: 'bench/img', mid, ...(mix !== undefined ? { mix } : {}) }
  const scenarios: Array<[typeof ALL[number], string, (c: Ctx) => Promise<Row[]>]> = [
    ['blob', '1+2 warm hit / cold miss', blobColdWarm],
    ['herd', '3 herd', herd],
    ['small', '4 small requests', smallRequests],
    ['skopeo', '5 skopeo copy', skopeoPulls],
    ['mix', '11 realistic image mix', realisticMix],
    ['mesh', '6 mesh', mesh],
    ['meshherd', '9 mesh herd', meshHerd],
    ['meshscale', '10 mesh scale', meshScale],
    ['memory', '7+8 memory / start-up', memoryAndStartup],
  ]
  const rows: Row[] = []
  let crashed = 0
  for (const [key, name, fn] of scenarios) {
    if (!only.has(key)) continue
    log(`scenario ${name}`)
    const t0 = Date.now()
    try {
      rows.push(...await fn(ctx))
    } catch (err) {
      crashed++
      const msg = err instanceof Error ? err.message : String(err)
      log(`scenario ${name} FAILED: ${err instanceof Error ? err.stack ?? msg : msg}`)
      rows.push(notRun(name, msg.split('\n')[0] ?? msg, 'failed'))
    }
    log(`scenario ${name} took ${((Date.now() - t0) / 1000).toFixed(1)} s`)
  }

  const header = `## pullmesh vs distribution ${smoke ? '(SMOKE: tiny sizes, not meaningful)' : ''}\n\n` +
    `${new Date().toISOString()}, node ${process.version}, ${runs} run(s) per scenario, alternating; ratio = pullmesh ÷ distribution (medians).`
  const md = markdown(rows, header)
  console.log('\n' + md)
  await mkdir(RESULTS, { recursive: true })
  const json = JSON.stringify({ date: new Date().toISOString(), smoke, runs, sizes, node: process.version, rows: toJson(rows) }, null, 2)
  await writeFile(join(RESULTS, smoke ? 'smoke.md' : 'latest.md'), md)
  await writeFile(join(RESULTS, smoke ? 'smoke.json' : 'latest.json'), json)
  await writeFile(join(RESULTS, `bench-${smoke ? 'smoke-' : ''}${new Date().toISOString().replace(/[:.]/g, '-')}.json`), json)
  log(`wrote ${RESULTS}${smoke ? 'smoke' : 'latest'}.{md,json}`)
  return crashed > 0 ? 1 : 0
}

let code = 1
try {
  code = await main()
} catch (err) {
  console.error(err instanceof Error ? err.stack ?? err.message : String(err))
  code = 1
} finally {
  await cleanup()
}
process.exit(code)
