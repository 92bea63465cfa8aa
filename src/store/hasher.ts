// Hashing a blob's temp file on a worker thread, as its bytes land.
//
// On a cold miss the main thread carries the upstream's bytes in, the writes out and every client's
// reads; sha256 alone was ~45% of its busy time (0.6 s per GiB), and the main thread was the limit.
// The worker reads the temp file (from the page cache) up to what the writer has confirmed written,
// so no bytes cross threads and what is verified is what is on disk. Jobs run in order, one at a time.
// The worker is plain JavaScript run with eval, so the same code serves the built daemon and the tests.
import { Worker } from 'node:worker_threads'

const WORKER_SOURCE = `
const { parentPort } = require('node:worker_threads')
const { createHash } = require('node:crypto')
const fs = require('node:fs')
const jobs = new Map()
const buf = Buffer.allocUnsafe(1024 * 1024)
function advance (job, upTo) {
  while (job.pos < upTo) {
    const n = fs.readSync(job.fd, buf, 0, Math.min(buf.length, upTo - job.pos), job.pos)
    if (n === 0) throw new Error('the file ended at ' + job.pos + ', before ' + upTo)
    job.hash.update(buf.subarray(0, n))
    job.pos += n
  }
}
function close (id) {
  const job = jobs.get(id)
  jobs.delete(id)
  if (job !== undefined && job.fd !== undefined) try { fs.closeSync(job.fd) } catch {}
}
parentPort.on('message', (m) => {
  if (m.op === 'open') {
    const job = { fd: undefined, hash: undefined, pos: 0, error: undefined }
    jobs.set(m.id, job)
    try { job.fd = fs.openSync(m.path, 'r'); job.hash = createHash(m.alg) } catch (err) { job.error = String(err && err.message || err) }
    return
  }
  const job = jobs.get(m.id)
  if (job === undefined) return
  if (m.op === 'drop') { close(m.id); return }
  if (job.error === undefined) {
    try { advance(job, m.upTo) } catch (err) { job.error = String(err && err.message || err) }
  }
  if (m.op === 'finish') {
    close(m.id)
    parentPort.postMessage(job.error === undefined ? { id: m.id, hex: job.hash.digest('hex') } : { id: m.id, error: job.error })
  }
})
`

const ADVANCE_STEP = 1024 * 1024

/** One file's running hash. advance() and digest() take byte counts the file already holds. */
export interface FileHash {
  advance: (upTo: number) => void
  /** The hex digest of the file's first `size` bytes. */
  digest: (size: number) => Promise<string>
  drop: () => void
}

export class FileHasher {
  private worker: Worker | undefined
  private nextId = 1
  private readonly pending = new Map<number, { resolve: (hex: string) => void, reject: (err: Error) => void }>()
  private readonly online = new WeakSet<Worker>()

  /** A hash of the file at `path` with `algorithm` (a node:crypto name), computed off the main thread. */
  open (path: string, algorithm: string): FileHash {
    const worker = this.worker ?? this.spawn()
    const id = this.nextId++
    worker.postMessage({ op: 'open', id, path, alg: algorithm })
    let ended = false
    let told = 0
    return {
      // At most one message per MiB: the worker catches up on the rest at the next one, or at finish.
      advance: (upTo) => {
        if (ended || upTo - told < ADVANCE_STEP) return
        told = upTo
        worker.postMessage({ op: 'advance', id, upTo })
      },
      digest: async (size) => {
        if (ended) throw new Error('file hash already ended')
        ended = true
        return await new Promise<string>((resolve, reject) => {
          if (this.worker !== worker) { reject(new Error('the hashing thread stopped')); return }
          this.pending.set(id, { resolve, reject })
          worker.postMessage({ op: 'finish', id, upTo: size })
        })
      },
      drop: () => {
        if (ended) return
        ended = true
        if (this.worker === worker) worker.postMessage({ op: 'drop', id })
      },
    }
  }

  /**
   * Starts the thread now, so that the first big fill does not pay for it: constructing a Worker takes
   * a few ms on the main thread, and booting one took 50–350 ms of a shared core in a fresh daemon,
   * during which the first fill's hash fell behind and its last byte waited. Resolves once the thread
   * runs (or could not start: open() then tries again, and the store hashes in line if that fails
   * too), and after `maxWaitMs` at the latest. Harmless to call twice.
   */
  async start (maxWaitMs = 2000): Promise<void> {
    let w: Worker
    try { w = this.worker ?? this.spawn() } catch { return }
    if (this.online.has(w)) return
    let timer: NodeJS.Timeout | undefined
    await new Promise<void>(resolve => {
      const done = (): void => { clearTimeout(timer); w.off('online', done); w.off('exit', done); resolve() }
      timer = setTimeout(done, maxWaitMs)
      w.once('online', done)
      w.once('exit', done)
    })
  }

  async stop (): Promise<void> {
    const w = this.worker
    this.worker = undefined
    this.failAll(new Error('the store is stopping'))
    await w?.terminate()
  }

  private spawn (): Worker {
    const w = new Worker(WORKER_SOURCE, { eval: true })
    w.unref()
    w.once('online', () => { this.online.add(w) })
    w.on('message', (m: { id: number, hex?: string, error?: string }) => {
      const p = this.pending.get(m.id)
      if (p === undefined) return
      this.pending.delete(m.id)
      if (m.hex !== undefined) p.resolve(m.hex)
      else p.reject(new Error(`hashing failed: ${m.error ?? 'unknown error'}`))
    })
    const gone = (err: Error): void => {
      if (this.worker !== w) return
      // Jobs on this thread fail (their writers fail and clean up); the next open() starts a new one.
      this.worker = undefined
      this.failAll(err)
    }
    w.on('error', gone)
    w.on('exit', code => { gone(new Error(`the hashing thread exited (${code})`)) })
    this.worker = w
    return w
  }

  private failAll (err: Error): void {
    for (const p of this.pending.values()) p.reject(err)
    this.pending.clear()
  }
}
