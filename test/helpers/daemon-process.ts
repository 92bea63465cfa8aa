// Run the pullmesh CLI (`node dist/main.js start ...`) as a separate process,
// the way users run it. The daemon logs pino JSON lines on stdout; the line
// with msg "pullmesh listening" carries the URL, and every finished request is
// logged with msg "request".
import { spawn, type ChildProcess } from 'node:child_process'
import { access } from 'node:fs/promises'
import { fileURLToPath } from 'node:url'
import { join } from 'node:path'

export const REPO_ROOT = fileURLToPath(new URL('../..', import.meta.url))
/** The CLI entry; PULLMESH_E2E_ENTRY overrides it (e.g. to run the suite against another build). */
export const DAEMON_ENTRY = process.env.PULLMESH_E2E_ENTRY ?? join(REPO_ROOT, 'dist', 'main.js')

export interface DaemonOptions {
  dataDir: string
  /** name → URL, e.g. { '127.0.0.1:5001': 'http://127.0.0.1:5001' }. */
  upstreams: Record<string, string>
  /** Default '127.0.0.1:0'. On restart, the port of the previous run is reused if this was :0. */
  listen?: string
  tagTtl?: string
  logLevel?: string
  /**
   * Run the LAN mesh. Default false: `--no-mesh`, because the mesh listens on
   * fixed ports (0.0.0.0:5050, tcp/4001) that parallel test files would share.
   * With true, the mesh listens on ephemeral 127.0.0.1 ports instead.
   */
  mesh?: boolean
  /**
   * With `mesh: true`: the mesh listen addresses to use instead of the ephemeral 127.0.0.1 ones,
   * e.g. `{ p2p: ['/ip4/0.0.0.0/tcp/4001'], peer: '0.0.0.0:5050' }` inside a network namespace.
   */
  meshListen?: { p2p: string[], peer: string }
  /**
   * Discover peers by mDNS. Default false (`--no-mdns`). Only ever true together with `netns`:
   * multicast must never run in the root network namespace (see test/helpers/netns.ts).
   */
  mdns?: boolean
  /** Run inside this network namespace: the command becomes `ip netns exec NAME node ...` (ip execs, so the PID is node's). */
  netns?: string
  extraArgs?: string[]
  env?: NodeJS.ProcessEnv
  startTimeoutMs?: number
}

export interface RequestLog {
  method: string
  url: string
  statusCode: number
  [k: string]: unknown
}

export interface DaemonProcess {
  url: string
  host: string
  port: number
  pid: number
  args: string[]
  logs: () => string[]
  /** Parsed `msg: "request"` lines, in order. */
  requests: () => RequestLog[]
  /** Send `signal` (default SIGTERM), wait for exit; resolves to the exit code (or 128+signo when killed). */
  stop: (signal?: NodeJS.Signals, timeoutMs?: number) => Promise<number>
  /** SIGKILL and wait for exit. */
  kill: () => Promise<number>
  exited: () => boolean
}

const SIGNO: Partial<Record<NodeJS.Signals, number>> = { SIGTERM: 15, SIGKILL: 9, SIGINT: 2, SIGHUP: 1 }

export function daemonArgs (o: DaemonOptions): string[] {
  const args = [DAEMON_ENTRY, 'start', '--listen', o.listen ?? '127.0.0.1:0', '--data-dir', o.dataDir]
  for (const [name, url] of Object.entries(o.upstreams)) args.push('--upstream', `${name}=${url}`)
  if (o.mdns === true && o.netns === undefined) throw new Error('mdns: true needs netns: multicast must not run in the root network namespace')
  if (o.mdns !== true) args.push('--no-mdns')
  args.push('--log-level', o.logLevel ?? 'info')
  if (o.mesh === true) {
    const l = o.meshListen ?? { p2p: ['/ip4/127.0.0.1/tcp/0'], peer: '127.0.0.1:0' }
    args.push('--peer-listen', l.peer)
    for (const a of l.p2p) args.push('--p2p-listen', a)
  } else args.push('--no-mesh')
  if (o.tagTtl !== undefined) args.push('--tag-ttl', o.tagTtl)
  args.push(...(o.extraArgs ?? []))
  return args
}

export async function startDaemon (o: DaemonOptions): Promise<DaemonProcess> {
  try {
    await access(DAEMON_ENTRY)
  } catch {
    throw new Error(`${DAEMON_ENTRY} is missing: build first (npm test runs tsc in pretest; or npx tsc -p tsconfig.json)`)
  }
  const args = daemonArgs(o)
  const [cmd, argv] = o.netns === undefined ? [process.execPath, args] : ['ip', ['netns', 'exec', o.netns, process.execPath, ...args]]
  const child: ChildProcess = spawn(cmd, argv, {
    cwd: REPO_ROOT,
    env: o.env ?? process.env,
    stdio: ['ignore', 'pipe', 'pipe'],
  })
  const lines: string[] = []
  const stderr: string[] = []
  let partial = ''
  let exit: { code: number | null, signal: NodeJS.Signals | null } | undefined
  const exitPromise = new Promise<void>(resolve => child.once('exit', (code, signal) => { exit = { code, signal }; resolve() }))

  let onLine: ((line: string) => void) | undefined
  child.stdout?.setEncoding('utf8')
  child.stdout?.on('data', (s: string) => {
    partial += s
    let nl: number
    while ((nl = partial.indexOf('\n')) >= 0) {
      const line = partial.slice(0, nl)
      partial = partial.slice(nl + 1)
      lines.push(line)
      onLine?.(line)
    }
  })
  child.stderr?.setEncoding('utf8')
  child.stderr?.on('data', (s: string) => { stderr.push(s) })
  const logs = (): string[] => partial === '' ? [...lines] : [...lines, partial]
  const dump = (): string => `args: ${o.netns !== undefined ? `ip netns exec ${o.netns} ` : ''}node ${args.join(' ')}\n--- stdout ---\n${logs().slice(-60).join('\n')}\n--- stderr ---\n${stderr.join('').slice(-4000)}`

  const url = await new Promise<string>((resolve, reject) => {
    const timer = setTimeout(() => { cleanup(); child.kill('SIGKILL'); reject(new Error(`pullmesh did not print its listening line in time\n${dump()}`)) }, o.startTimeoutMs ?? 20_000)
    const check = (line: string): void => {
      let rec: Record<string, unknown>
      try { rec = JSON.parse(line) as Record<string, unknown> } catch { return }
      if (rec.msg === 'pullmesh listening' && typeof rec.url === 'string') { cleanup(); resolve(rec.url) }
    }
    const onExit = (): void => { cleanup(); reject(new Error(`pullmesh exited during start-up (${exit?.code ?? exit?.signal})\n${dump()}`)) }
    const onError = (e: Error): void => { cleanup(); reject(e) }
    function cleanup (): void { clearTimeout(timer); onLine = undefined; child.off('exit', onExit); child.off('error', onError) }
    onLine = check
    for (const l of lines) check(l)
    child.once('exit', onExit)
    child.once('error', onError)
  })
  const u = new URL(url)

  const waitExit = async (timeoutMs: number): Promise<number> => {
    if (exit === undefined) {
      const t = setTimeout(() => { if (exit === undefined) child.kill('SIGKILL') }, timeoutMs)
      await exitPromise
      clearTimeout(t)
    }
    if (exit?.code !== null && exit?.code !== undefined) return exit.code
    return 128 + (SIGNO[exit?.signal ?? 'SIGKILL'] ?? 9)
  }

  return {
    url: `${u.protocol}//${u.host}`,
    host: u.host,
    port: Number(u.port),
    pid: child.pid ?? -1,
    args,
    logs,
    requests () {
      const out: RequestLog[] = []
      for (const l of lines) {
        if (!l.includes('"request"')) continue
        try {
          const rec = JSON.parse(l) as Record<string, unknown>
          if (rec.msg === 'request' && typeof rec.url === 'string') out.push(rec as unknown as RequestLog)
        } catch {}
      }
      return out
    },
    async stop (signal = 'SIGTERM', timeoutMs = 10_000) {
      if (exit === undefined) child.kill(signal)
      return await waitExit(timeoutMs)
    },
    async kill () {
      if (exit === undefined) child.kill('SIGKILL')
      return await waitExit(5000)
    },
    exited: () => exit !== undefined,
  }
}

/**
 * Start again with the same data dir and upstreams. With `samePort` (default
 * true) the new process listens on the port of `prev`, so clients configured
 * with the old address keep working.
 */
export async function restartDaemon (prev: DaemonProcess, o: DaemonOptions, samePort = true): Promise<DaemonProcess> {
  if (!prev.exited()) await prev.stop()
  const listen = samePort ? `${prev.host.split(':')[0] ?? '127.0.0.1'}:${prev.port}` : o.listen
  return await startDaemon({ ...o, ...(listen !== undefined ? { listen } : {}) })
}
