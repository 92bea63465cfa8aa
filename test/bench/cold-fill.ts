// Cold fills of one blob size, pullmesh builds side by side with the distribution registry (proxy mode),
// same upstream, alternating, in a fresh process (the first request after start) and in a warm one (a
// process that has filled a blob before). Not part of `npm run bench`:
//   node --import tsx test/bench/cold-fill.ts [--size-mib 64] [--runs 5] [--entry name=dist/main.js ...]
// Without --entry it measures this checkout's dist/main.js as "pullmesh". Prints medians of time to
// first byte and total time per build, and the load average before and after.
import { mkdtemp, rm } from 'node:fs/promises'
import { loadavg, tmpdir } from 'node:os'
import { join } from 'node:path'
import { curlDownload } from './lib/load.js'
import { startDistribution, startPullmesh, stopAll, UPSTREAM_NAME } from './lib/procs.js'
import { median } from './lib/report.js'
import { arg, entries as parseEntries } from './lib/args.js'
import { seedBlob, type SeededBlob } from './lib/seed.js'

const argv = process.argv.slice(2)
const size = Number(arg(argv, '--size-mib', '64')) * 2 ** 20
const runs = Number(arg(argv, '--runs', '5'))
const entries = parseEntries(argv)

interface Inst { name: string, url: (b: SeededBlob) => string, stop: () => Promise<void> }
const names = [...entries.map(e => e[0]), 'distribution']
const res = (): Record<string, { ttfb: number[], total: number[] }> => Object.fromEntries(names.map(n => [n, { ttfb: [], total: [] }]))
const load = (): string => loadavg().map(l => l.toFixed(2)).join(' ')

const scratch = await mkdtemp(join(tmpdir(), 'pullmesh-coldfill-'))
let dirs = 0
async function start (name: string): Promise<Inst> {
  const dir = join(scratch, `i${dirs++}`)
  const entry = entries.find(e => e[0] === name)?.[1]
  if (entry !== undefined) {
    const pm = await startPullmesh({ dataDir: dir, upstream: up.url, entry })
    return { name, url: b => `${pm.url}/v2/${UPSTREAM_NAME}/${b.repo}/blobs/${b.digest}`, stop: async () => { await pm.stop(); await rm(dir, { recursive: true, force: true }) } }
  }
  const d = await startDistribution({ dir, proxy: up.url })
  return { name, url: b => `${d.url}/v2/${b.repo}/blobs/${b.digest}`, stop: async () => { await d.stop(); await rm(dir, { recursive: true, force: true }) } }
}
const up = await startDistribution({ dir: join(scratch, 'up') })
try {
  const blobs: SeededBlob[] = []
  for (let i = 0; i <= runs; i++) blobs.push(await seedBlob(up.url, 'bench/cold', size))
  console.log(`${runs} runs of a ${size / 2 ** 20} MiB cold blob; load average ${load()}`)
  const order = (i: number): string[] => names.map((_, k) => names[(k + i) % names.length]!)
  const fresh = res()
  for (let i = 0; i < runs; i++) {
    for (const n of order(i)) {
      const inst = await start(n)
      try {
        const d = await curlDownload(inst.url(blobs[i]!), { expectBytes: size })
        fresh[n]!.ttfb.push(d.ttfb * 1000); fresh[n]!.total.push(d.total * 1000)
      } finally { await inst.stop() }
    }
  }
  const warm = res()
  const insts = new Map<string, Inst>()
  for (const n of names) insts.set(n, await start(n))
  try {
    for (const inst of insts.values()) await curlDownload(inst.url(blobs[runs]!), { expectBytes: size })
    for (let i = 0; i < runs; i++) {
      for (const n of order(i)) {
        const d = await curlDownload(insts.get(n)!.url(blobs[i]!), { expectBytes: size })
        warm[n]!.ttfb.push(d.ttfb * 1000); warm[n]!.total.push(d.total * 1000)
        await new Promise(resolve => setTimeout(resolve, 300))
      }
    }
  } finally { for (const inst of insts.values()) await inst.stop() }
  const fmt = (xs: number[]): string => `${(median(xs) ?? NaN).toFixed(1).padStart(7)} ms  [${xs.map(x => x.toFixed(0)).join(' ')}]`
  for (const [label, r] of [['fresh process', fresh], ['warm process', warm]] as const) {
    console.log(`\n${label}: medians of ${runs}`)
    for (const n of names) {
      console.log(`  ${n.padEnd(14)} ttfb ${fmt(r[n]!.ttfb)}   total ${fmt(r[n]!.total)}`)
    }
  }
  console.log(`\nload average at the end ${load()}`)
} finally {
  await stopAll()
  await rm(scratch, { recursive: true, force: true })
}
