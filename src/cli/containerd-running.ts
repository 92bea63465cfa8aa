// Finds the containerd daemons running on this host and the config each one runs with, so that
// `pullmesh configure containerd` checks the config containerd actually loaded, not only the default file:
// - the config file comes from the process's own command line (`--config`/`-c`), read through /proc;
// - its effective content comes from `containerd --config FILE config dump`, which applies `imports`
//   and defaults the way the daemon does (the file itself is read when the binary is not at hand);
// - a file changed after the process started is not what it runs with: containerd reads it only at start.
import { execFile } from 'node:child_process'
import { readdir, readFile, stat } from 'node:fs/promises'
import { join } from 'node:path'

export const CONTAINERD_DEFAULT_CONFIG = '/etc/containerd/config.toml'

export interface RunningContainerd {
  pid: number
  /** The config file as the process names it (relative to its own root and working directory). */
  configFile: string
  /** The same file as this process can read it (through /proc/PID/root). */
  readablePath: string
  /** When the process started (ms since the epoch), when known. */
  startedAtMs?: number
}

/** The config file a containerd command line names (`--config F`, `--config=F`, `-c F`), or the default. */
export function containerdConfigFromArgs (argv: string[]): string {
  for (let i = 1; i < argv.length; i++) {
    const a = argv[i]!
    if (a === '--config' || a === '-c' || a === '-config') { const v = argv[i + 1]; if (v !== undefined && v !== '') return v }
    const eq = /^--?(?:config|c)=(.+)$/.exec(a)
    if (eq !== null) return eq[1]!
  }
  return CONTAINERD_DEFAULT_CONFIG
}

/** A process's start time from its /proc/PID/stat line and the boot time (s since the epoch). USER_HZ is 100 on Linux. */
export function processStartMs (statLine: string, bootTimeS: number, ticksPerSecond = 100): number | undefined {
  const close = statLine.lastIndexOf(')')
  if (close < 0) return undefined
  // Fields after the command name start at field 3 (state); starttime is field 22.
  const fields = statLine.slice(close + 2).split(' ')
  const ticks = Number(fields[22 - 3])
  if (!Number.isFinite(ticks)) return undefined
  return Math.round((bootTimeS + ticks / ticksPerSecond) * 1000)
}

/** Every process named `containerd` (not containerd-shim), with its config file and start time. Empty when /proc is not readable. */
export async function findRunningContainerds (proc = '/proc'): Promise<RunningContainerd[]> {
  let entries: string[]
  try { entries = await readdir(proc) } catch { return [] }
  // The boot time from the uptime (10 ms steps), not /proc/stat's btime, which is whole seconds: a config
  // written a moment before containerd started must not look newer than the process.
  let bootTimeS: number | undefined
  try { bootTimeS = (Date.now() - Number((await readFile(join(proc, 'uptime'), 'utf8')).split(' ')[0]) * 1000) / 1000 } catch { bootTimeS = undefined }
  const found: RunningContainerd[] = []
  for (const e of entries) {
    if (!/^\d+$/.test(e)) continue
    try {
      if ((await readFile(join(proc, e, 'comm'), 'utf8')).trim() !== 'containerd') continue
      const argv = (await readFile(join(proc, e, 'cmdline'), 'utf8')).split('\0').filter(a => a !== '')
      const configFile = containerdConfigFromArgs(argv)
      const readablePath = configFile.startsWith('/')
        ? join(proc, e, 'root', configFile)
        : join(proc, e, 'cwd', configFile)
      const startedAtMs = bootTimeS !== undefined && Number.isFinite(bootTimeS)
        ? processStartMs(await readFile(join(proc, e, 'stat'), 'utf8'), bootTimeS)
        : undefined
      found.push({ pid: Number(e), configFile, readablePath, ...(startedAtMs !== undefined ? { startedAtMs } : {}) })
    } catch {
      // The process ended while we looked, or is not ours to read: skip it.
    }
  }
  return found.sort((a, b) => a.pid - b.pid)
}

/** `containerd --config FILE config dump` (imports and defaults applied), or undefined when it cannot run. */
export async function dumpContainerdConfig (file: string, timeoutMs = 5_000): Promise<string | undefined> {
  return await new Promise(resolve => {
    execFile('containerd', ['--config', file, 'config', 'dump'], { timeout: timeoutMs, maxBuffer: 4 << 20 }, (err, stdout) => {
      resolve(err === null && stdout.trim() !== '' ? stdout : undefined)
    })
  })
}

export interface RunningConfig {
  /** The effective config text, and where it came from. */
  text?: string
  source: 'dump' | 'file' | 'none'
  /** The config file was changed after the process started: containerd is not running with it. */
  changedSinceStart: boolean
}

/** What a running containerd's config says, as far as we can tell from here. */
export async function runningContainerdConfig (c: RunningContainerd): Promise<RunningConfig> {
  let mtimeMs: number | undefined
  try { mtimeMs = (await stat(c.readablePath)).mtimeMs } catch { mtimeMs = undefined }
  const changedSinceStart = mtimeMs !== undefined && c.startedAtMs !== undefined && mtimeMs > c.startedAtMs + 50
  if (mtimeMs === undefined) return { source: 'none', changedSinceStart: false }
  const dumped = await dumpContainerdConfig(c.readablePath)
  if (dumped !== undefined) return { text: dumped, source: 'dump', changedSinceStart }
  try {
    return { text: await readFile(c.readablePath, 'utf8'), source: 'file', changedSinceStart }
  } catch {
    return { source: 'none', changedSinceStart }
  }
}
