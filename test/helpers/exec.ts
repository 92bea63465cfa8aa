// Small process helpers for the e2e suite: run a binary to completion, check
// that required binaries exist (a missing one fails the test loudly), and time
// a piece of work.
import { spawn, type SpawnOptions } from 'node:child_process'
import { accessSync, constants } from 'node:fs'
import { delimiter, join } from 'node:path'
import { createServer } from 'node:net'

export interface RunResult {
  code: number | null
  signal: NodeJS.Signals | null
  stdout: string
  stderr: string
  ms: number
}

export interface RunOptions {
  cwd?: string
  env?: NodeJS.ProcessEnv
  /** Kill the process (SIGKILL) after this many ms. Default 120 s. */
  timeoutMs?: number
  /** Do not throw on a non-zero exit; return the result instead. */
  allowFailure?: boolean
  input?: string | Buffer
}

export class CommandError extends Error {
  override name = 'CommandError'
  constructor (readonly cmd: string, readonly args: readonly string[], readonly result: RunResult) {
    super(`${cmd} ${args.join(' ')} exited with ${result.code ?? result.signal} after ${result.ms} ms\n` +
      `--- stdout ---\n${tail(result.stdout)}\n--- stderr ---\n${tail(result.stderr)}`)
  }
}

function tail (s: string, max = 4000): string {
  return s.length > max ? '…' + s.slice(-max) : s
}

/** Run `cmd args` to completion. Throws CommandError on a non-zero exit unless allowFailure. */
export async function run (cmd: string, args: readonly string[], o: RunOptions = {}): Promise<RunResult> {
  const started = performance.now()
  const spawnOpts: SpawnOptions = { cwd: o.cwd, env: o.env ?? process.env, stdio: ['pipe', 'pipe', 'pipe'] }
  const child = spawn(cmd, args, spawnOpts)
  const out: Buffer[] = []
  const err: Buffer[] = []
  child.stdout?.on('data', (b: Buffer) => out.push(b))
  child.stderr?.on('data', (b: Buffer) => err.push(b))
  if (o.input !== undefined) child.stdin?.end(o.input)
  else child.stdin?.end()
  const timer = setTimeout(() => child.kill('SIGKILL'), o.timeoutMs ?? 120_000)
  try {
    const result = await new Promise<RunResult>((resolve, reject) => {
      child.once('error', reject)
      child.once('close', (code, signal) => resolve({
        code,
        signal,
        stdout: Buffer.concat(out).toString('utf8'),
        stderr: Buffer.concat(err).toString('utf8'),
        ms: Math.round(performance.now() - started),
      }))
    })
    if (result.code !== 0 && o.allowFailure !== true) throw new CommandError(cmd, args, result)
    return result
  } finally {
    clearTimeout(timer)
  }
}

/** Absolute path of `name` on PATH, or undefined. */
export function which (name: string): string | undefined {
  for (const dir of (process.env.PATH ?? '').split(delimiter)) {
    if (dir === '') continue
    const p = join(dir, name)
    try {
      accessSync(p, constants.X_OK)
      return p
    } catch {}
  }
  return undefined
}

/**
 * Throw a clear error when a binary the test needs is missing. e2e tests call
 * this in beforeAll so that a missing tool FAILS the run instead of skipping.
 */
export function requireBinaries (...names: string[]): void {
  const missing = names.filter(n => which(n) === undefined)
  if (missing.length > 0) {
    throw new Error(`e2e prerequisites missing on PATH: ${missing.join(', ')} ` +
      '(apt-get install -y docker-registry skopeo containerd)')
  }
}

/** e2e tests need root (containerd, mounts). */
export function requireRoot (): void {
  if (typeof process.getuid === 'function' && process.getuid() !== 0) {
    throw new Error('e2e tests must run as root (containerd needs it)')
  }
}

/** Run fn and return its result with the wall time in ms. */
export async function timed<T> (fn: () => Promise<T>): Promise<{ value: T, ms: number }> {
  const t0 = performance.now()
  const value = await fn()
  return { value, ms: Math.round(performance.now() - t0) }
}

/** A TCP port that was free a moment ago on 127.0.0.1. */
export async function freePort (): Promise<number> {
  return await new Promise((resolve, reject) => {
    const srv = createServer()
    srv.once('error', reject)
    srv.listen(0, '127.0.0.1', () => {
      const addr = srv.address()
      if (addr === null || typeof addr === 'string') { srv.close(); reject(new Error('no port')); return }
      srv.close(() => resolve(addr.port))
    })
  })
}

/** Poll `check` until it returns a truthy value or the deadline passes. */
export async function waitFor<T> (check: () => Promise<T | undefined | false> | T | undefined | false, o: { timeoutMs?: number, intervalMs?: number, what?: string } = {}): Promise<T> {
  const deadline = Date.now() + (o.timeoutMs ?? 15_000)
  let lastErr: unknown
  for (;;) {
    try {
      const v = await check()
      if (v !== undefined && v !== false) return v
    } catch (e) { lastErr = e }
    if (Date.now() > deadline) {
      throw new Error(`timed out waiting for ${o.what ?? 'condition'}` + (lastErr !== undefined ? `: ${String(lastErr)}` : ''))
    }
    await new Promise(r => setTimeout(r, o.intervalMs ?? 50))
  }
}
