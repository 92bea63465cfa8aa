// CPU cost of a cold fill: CPU seconds per GiB spent by each process under test, split into its main
// thread and all its other threads (pullmesh: hashing thread, libuv pool, GC; distribution: all of its
// goroutines, including the background second fetch that stores the blob), with the wall time. Builds of
// pullmesh side by side with the pass-through reference and distribution, long-lived processes, one
// cold blob per fill, alternating. On a shared machine wall times swing with other load; CPU per byte
// swings less. Not part of `npm run bench`:
//   node --import tsx test/bench/cold-fill-cpu.ts [--size-mib 256] [--runs 5] [--entry name=dist/main.js ...] [--no-pass] [--no-dist]
import { mkdtemp, readdir, readFile, rm } from 'node:fs/promises'
import { loadavg, tmpdir } from 'node:os'
import { join } from 'node:path'
import { curlDownload } from './lib/load.js'
import { startDistribution, startPassthrough, startPullmesh, stopAll, UPSTREAM_NAME } from './lib/procs.js'
import { median } from './lib/report.js'
import { arg, entries as parseEntries } from './lib/args.js'
import { seedBlob, type SeededBlob } from './lib/seed.js'

const argv = process.argv.slice(2)
const size = Number(arg(argv, '--size-mib', '256')) * 2 ** 20
const runs = Number(arg(argv, '--runs', '5'))
const entries = parseEntries(argv)

/** CPU seconds (user + system) of a process so far: its main thread, and all other threads. */
async function cpuOf (pid: number): Promise<{ main: number, rest: number }> {
  let main = 0; let rest = 0
  for (const t of await readdir(`/proc/${pid}/task`).catch(() => [] as string[])) {
    const s = await readFile(`/proc/${pid}/task/${t}/stat`, 'utf8').catch(() => '')
    if (s === '') continue
    const f = s.slice(s.lastIndexOf(')') + 2).split(' ')
    const v = (Number(f[11]) + Number(f[12])) / 100
    if (t === String(pid)) main += v
    else rest += v
  }
  return { main, rest }
}

interface Inst { name: string, pid: number, url: (b: SeededBlob) => string, settleMs: number }
const scratch = await mkdtemp(join(tmpdir(), 'pullmesh-coldcpu-'))
try {
  const up = await startDistribution({ dir: join(scratch, 'up') })
  const insts: Inst[] = []
  for (const [name, entry] of entries) {
    const pm = await startPullmesh({ dataDir: join(scratch, `pm-${insts.length}`), upstream: up.url, entry })
    insts.push({ name, pid: pm.pid, url: b => `${pm.url}/v2/${UPSTREAM_NAME}/${b.repo}/blobs/${b.digest}`, settleMs: 1500 })
  }
  if (!argv.includes('--no-pass')) {
    const p = await startPassthrough(up.url)
    insts.push({ name: 'pass-through', pid: p.pid, url: b => `${p.url}/v2/${b.repo}/blobs/${b.digest}`, settleMs: 500 })
  }
  if (!argv.includes('--no-dist')) {
    const d = await startDistribution({ dir: join(scratch, 'dist'), proxy: up.url })
    // Its second, background fetch stores the blob after the client's download: wait for it.
    insts.push({ name: 'distribution', pid: d.pid, url: b => `${d.url}/v2/${b.repo}/blobs/${b.digest}`, settleMs: Math.max(3000, size / 2 ** 20 * 8) })
  }
  console.log(`${runs} runs of a ${size / 2 ** 20} MiB cold blob per process; load average ${loadavg().map(l => l.toFixed(2)).join(' ')}`)
  const res = new Map(insts.map(i => [i.name, { main: [] as number[], rest: [] as number[], ms: [] as number[] }]))
  for (let r = 0; r < runs; r++) {
    for (let k = 0; k < insts.length; k++) {
      const inst = insts[(k + r) % insts.length]!
      const b = await seedBlob(up.url, 'bench/coldcpu', size)
      await new Promise(resolve => setTimeout(resolve, 500))
      const c0 = await cpuOf(inst.pid)
      const d = await curlDownload(inst.url(b), { expectBytes: size })
      await new Promise(resolve => setTimeout(resolve, inst.settleMs))
      const c1 = await cpuOf(inst.pid)
      const out = res.get(inst.name)!
      out.main.push(c1.main - c0.main); out.rest.push(c1.rest - c0.rest); out.ms.push(d.total * 1000)
    }
  }
  const gib = size / 2 ** 30
  const f = (xs: number[], scale: number, digits: number): string => `${((median(xs) ?? NaN) / scale).toFixed(digits)} [${xs.map(x => (x / scale).toFixed(digits)).join(' ')}]`
  console.log('CPU seconds per GiB (main thread, other threads), and wall ms of the download; medians [runs]')
  for (const [name, r] of res) {
    console.log(`  ${name.padEnd(14)} main ${f(r.main, gib, 2)}  other ${f(r.rest, gib, 2)}  wall ${f(r.ms, 1, 0)}`)
  }
  console.log(`load average at the end ${loadavg().map(l => l.toFixed(2)).join(' ')}`)
} finally {
  await stopAll()
  await rm(scratch, { recursive: true, force: true })
}
