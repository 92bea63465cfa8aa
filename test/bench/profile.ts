// CPU profiles of the pullmesh daemon in the benchmark's blob scenarios, with a summary of the top
// self-time functions. Not part of `npm run bench`:
//   node --import tsx test/bench/profile.ts [--size-mib 1024] [--out /tmp/prof] [--phases cold,warm,startup,cold-then-warm]
// Profiles (one per phase: cold miss, warm hit, start-up with a 10,000-blob index) are written by
// `node --cpu-prof` into --out and summarised on stdout.
import { mkdtemp, mkdir, readdir, readFile, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { curlDownload } from './lib/load.js'
import { startDistribution, startPullmesh, stopAll, UPSTREAM_NAME } from './lib/procs.js'
import { seedBlob, seedPullmeshIndex, smallBlobs } from './lib/seed.js'

const argv = process.argv.slice(2)
const arg = (n: string, d: string): string => { const i = argv.indexOf(n); return i >= 0 ? argv[i + 1] ?? d : d }
const size = Number(arg('--size-mib', '1024')) * 2 ** 20
const out = arg('--out', '/tmp/pullmesh-prof')
const phases = new Set(arg('--phases', 'cold,warm,startup,cold-then-warm').split(','))

interface ProfNode { id: number, callFrame: { functionName: string, url: string, lineNumber: number }, hitCount?: number }
interface Profile { nodes: ProfNode[], samples: number[], timeDeltas: number[], startTime: number, endTime: number }

/** Top self-time functions of a .cpuprofile, as printable lines. */
export function summarise (p: Profile, top = 15): string[] {
  const self = new Map<number, number>()
  for (let i = 0; i < p.samples.length; i++) self.set(p.samples[i]!, (self.get(p.samples[i]!) ?? 0) + (p.timeDeltas[i] ?? 0))
  const byFn = new Map<string, number>()
  let total = 0
  for (const n of p.nodes) {
    const us = self.get(n.id) ?? 0
    total += us
    const url = n.callFrame.url.replace(/^file:\/\/\/work\/main\//, '').replace(/^.*node_modules\//, 'nm/')
    const key = `${n.callFrame.functionName || '(anonymous)'}  ${url}${url !== '' ? ':' + (n.callFrame.lineNumber + 1) : ''}`
    byFn.set(key, (byFn.get(key) ?? 0) + us)
  }
  return [...byFn.entries()].sort((a, b) => b[1] - a[1]).slice(0, top)
    .map(([k, us]) => `${(us / 1000).toFixed(0).padStart(7)} ms ${(100 * us / total).toFixed(1).padStart(5)}%  ${k}`)
}

async function profiled (name: string, dataDir: string, upstream: string, work: (url: string) => Promise<void>): Promise<void> {
  if (!phases.has(name)) return
  const dir = join(out, name)
  await rm(dir, { recursive: true, force: true })
  await mkdir(dir, { recursive: true })
  const pm = await startPullmesh({ dataDir, upstream, nodeArgs: ['--cpu-prof', `--cpu-prof-dir=${dir}`] })
  console.log(`${name}: ready in ${pm.readyMs.toFixed(0)} ms`)
  const before = await threadCpu(pm.pid)
  await work(pm.url)
  const after = await threadCpu(pm.pid)
  const lines = [...after.entries()].map(([k, v]) => [k, v - (before.get(k) ?? 0)] as const).filter(([, v]) => v > 0.005).sort((a, b) => b[1] - a[1])
  console.log(`${name}: CPU seconds per thread during the work: ${lines.map(([k, v]) => `${k} ${v.toFixed(2)}`).join(', ')}`)
  await pm.stop(20_000)
  for (const f of await readdir(dir)) {
    if (!f.endsWith('.cpuprofile')) continue
    const p = JSON.parse(await readFile(join(dir, f), 'utf8')) as Profile
    console.log(`\n== ${name}: ${join(dir, f)} (${((p.endTime - p.startTime) / 1e6).toFixed(1)} s profiled), top self time:`)
    for (const l of summarise(p)) console.log(l)
  }
}

/** CPU seconds (user + system) per thread name of a process, summed over threads of the same name. */
async function threadCpu (pid: number): Promise<Map<string, number>> {
  const m = new Map<string, number>()
  for (const t of await readdir(`/proc/${pid}/task`).catch(() => [] as string[])) {
    const s = await readFile(`/proc/${pid}/task/${t}/stat`, 'utf8').catch(() => '')
    if (s === '') continue
    // Threads of Node 20 are mostly all called "node": the main thread is the one whose id is the pid.
    const comm = `${s.slice(s.indexOf('(') + 1, s.lastIndexOf(')'))}${t === String(pid) ? ' (main)' : `/${t}`}`
    const f = s.slice(s.lastIndexOf(')') + 2).split(' ')
    m.set(comm, (m.get(comm) ?? 0) + (Number(f[11]) + Number(f[12])) / 100)
  }
  return m
}

const scratch = await mkdtemp(join(tmpdir(), 'pullmesh-prof-'))
try {
  const up = await startDistribution({ dir: scratch, accessLog: true })
  const b = await seedBlob(up.url, 'bench/blob', size)
  const url = (base: string): string => `${base}/v2/${UPSTREAM_NAME}/${b.repo}/blobs/${b.digest}`
  const dataDir = join(scratch, 'pm')
  if (phases.has('warm') || phases.has('startup')) await seedPullmeshIndex(dataDir, smallBlobs(10_000, 'prof'))
  await profiled('cold', dataDir, up.url, async base => {
    const d = await curlDownload(url(base), { expectBytes: size })
    console.log(`cold: ${(d.bps / 2 ** 30).toFixed(2)} GiB/s, ttfb ${(d.ttfb * 1000).toFixed(0)} ms`)
    await new Promise(resolve => setTimeout(resolve, 2000))
  })
  await profiled('warm', dataDir, up.url, async base => {
    for (let i = 0; i < 3; i++) {
      const d = await curlDownload(url(base), { expectBytes: size })
      console.log(`warm #${i + 1}: ${(d.bps / 2 ** 30).toFixed(2)} GiB/s`)
    }
  })
  await profiled('startup', dataDir, up.url, async () => {})
  // The benchmark's warm runs use the process that did the cold fill: profile that case too.
  await profiled('cold-then-warm', join(scratch, 'pm2'), up.url, async base => {
    const c = await curlDownload(url(base), { expectBytes: size })
    console.log(`cold-then-warm: cold ${(c.bps / 2 ** 30).toFixed(2)} GiB/s`)
    await new Promise(resolve => setTimeout(resolve, 2000))
    for (let i = 0; i < 3; i++) {
      const d = await curlDownload(url(base), { expectBytes: size })
      console.log(`cold-then-warm: warm #${i + 1}: ${(d.bps / 2 ** 30).toFixed(2)} GiB/s`)
    }
  })
} finally {
  await stopAll()
  await rm(scratch, { recursive: true, force: true })
}
