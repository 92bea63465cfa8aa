// Load generators and probes: curl downloads to /dev/null, wrk runs, and an RSS sampler.
// Every run is bounded in time (curl --max-time, wrk -d plus a kill timer).
import { readFile } from 'node:fs/promises'
import { fileURLToPath } from 'node:url'
import { run } from '../../helpers/exec.js'

export interface Download {
  status: number
  bytes: number
  /** Seconds to the first body byte. */
  ttfb: number
  /** Seconds in total. */
  total: number
  /** bytes / total, in bytes per second. */
  bps: number
}

const CURL_FMT = '%{http_code} %{size_download} %{time_starttransfer} %{time_total}'

/** One download with curl to /dev/null. Throws unless the answer is 200 with `expectBytes` bytes. */
export async function curlDownload (url: string, o: { expectBytes?: number, maxTimeS?: number, netns?: string, headers?: string[] } = {}): Promise<Download> {
  const args = ['-sS', '-o', '/dev/null', '--max-time', String(o.maxTimeS ?? 300), '-w', CURL_FMT]
  for (const h of o.headers ?? []) args.push('-H', h)
  args.push(url)
  const [cmd, argv] = o.netns !== undefined ? ['ip', ['netns', 'exec', o.netns, 'curl', ...args]] : ['curl', args]
  const r = await run(cmd, argv as string[], { timeoutMs: ((o.maxTimeS ?? 300) + 10) * 1000, allowFailure: true })
  const [code, size, ttfb, total] = r.stdout.trim().split(' ').map(Number)
  const d: Download = { status: code ?? 0, bytes: size ?? 0, ttfb: ttfb ?? 0, total: total ?? 0, bps: (size ?? 0) / Math.max(total ?? 0, 1e-9) }
  if (r.code !== 0 || d.status !== 200 || (o.expectBytes !== undefined && d.bytes !== o.expectBytes)) {
    throw new Error(`download ${url} failed: curl exit ${r.code}, status ${d.status}, ${d.bytes} bytes (expected ${o.expectBytes}); ${r.stderr.trim().slice(0, 500)}`)
  }
  return d
}

/** `n` clients at once on the same URL; resolves with each download and the wall time (s) for all. */
export async function curlHerd (url: string, n: number, o: { expectBytes?: number, maxTimeS?: number } = {}): Promise<{ each: Download[], wall: number }> {
  const t0 = performance.now()
  const each = await Promise.all(Array.from({ length: n }, async () => await curlDownload(url, o)))
  return { each, wall: (performance.now() - t0) / 1000 }
}

export interface WrkResult { rps: number, p50ms: number, p99ms: number, requests: number, errors: number, non2xx: number }

function toMs (v: string): number {
  const m = /^([\d.]+)(us|ms|s|m)$/.exec(v.trim())
  if (m === null) return Number.NaN
  const n = Number(m[1])
  return m[2] === 'us' ? n / 1000 : m[2] === 'ms' ? n : m[2] === 's' ? n * 1000 : n * 60_000
}

/**
 * GET: wrk with `connections` connections for `durationS` seconds. HEAD: Debian's wrk 4.1 waits for a
 * body after a HEAD response with Content-Length and stalls, so HEAD goes through ./head-load.mjs, a
 * closed-loop raw-socket client in its own process (same connections and duration).
 */
export async function wrk (url: string, o: { method?: 'GET' | 'HEAD', connections?: number, threads?: number, durationS: number, headers?: string[] }): Promise<WrkResult> {
  if (o.method === 'HEAD') {
    const script = fileURLToPath(new URL('./head-load.mjs', import.meta.url))
    const r = await run(process.execPath, [script, url, String(o.connections ?? 50), String(o.durationS), JSON.stringify(o.headers ?? [])], { timeoutMs: (o.durationS + 20) * 1000 })
    const j = JSON.parse(r.stdout) as { requests: number, rps: number, p50ms: number, p99ms: number, non2xx: number, errors: number }
    return { ...j }
  }
  const args = ['-t', String(o.threads ?? 2), '-c', String(o.connections ?? 50), '-d', `${o.durationS}s`, '--latency', '--timeout', '5s']
  for (const h of o.headers ?? []) args.push('-H', h)
  args.push(url)
  const r = await run('wrk', args, { timeoutMs: (o.durationS + 20) * 1000 })
  const out = r.stdout
  const rps = Number(/Requests\/sec:\s+([\d.]+)/.exec(out)?.[1])
  const p50 = /^\s+50%\s+(\S+)/m.exec(out)?.[1]
  const p99 = /^\s+99%\s+(\S+)/m.exec(out)?.[1]
  const requests = Number(/(\d+) requests in/.exec(out)?.[1] ?? 0)
  const err = /Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)/.exec(out)
  const errors = err === null ? 0 : err.slice(1).reduce((a, b) => a + Number(b), 0)
  const non2xx = Number(/Non-2xx or 3xx responses: (\d+)/.exec(out)?.[1] ?? 0)
  if (!Number.isFinite(rps) || p99 === undefined) throw new Error(`could not parse wrk output:\n${out}\n${r.stderr}`)
  return { rps, p50ms: toMs(p50 ?? ''), p99ms: toMs(p99), requests, errors, non2xx }
}

/** Reads VmRSS and VmHWM (KiB → bytes) of a process. */
export async function memOf (pid: number): Promise<{ rss: number, hwm: number }> {
  const s = await readFile(`/proc/${pid}/status`, 'utf8')
  const kb = (k: string): number => Number(new RegExp(`^${k}:\\s+(\\d+) kB`, 'm').exec(s)?.[1] ?? Number.NaN) * 1024
  return { rss: kb('VmRSS'), hwm: kb('VmHWM') }
}

/** CPU time (user + system, seconds) a process has used so far; /proc counts in USER_HZ = 100 ticks. */
export async function cpuSeconds (pid: number): Promise<number> {
  const s = await readFile(`/proc/${pid}/stat`, 'utf8')
  const f = s.slice(s.lastIndexOf(')') + 2).split(' ')
  return (Number(f[11]) + Number(f[12])) / 100
}

/** Samples VmRSS every `intervalMs` until `stop()`; returns the peak seen (and the final VmHWM). */
export function sampleRss (pid: number, intervalMs = 50): { stop: () => Promise<{ peakRss: number, hwm: number }> } {
  let peak = 0
  let stopped = false
  const loop = (async () => {
    while (!stopped) {
      try { peak = Math.max(peak, (await memOf(pid)).rss) } catch { return }
      await new Promise(resolve => setTimeout(resolve, intervalMs))
    }
  })()
  return {
    async stop () {
      stopped = true
      await loop
      let hwm = Number.NaN
      try { hwm = (await memOf(pid)).hwm } catch {}
      return { peakRss: peak, hwm }
    },
  }
}
