// The write side of a blob writer: chunks in, few large positional writes out.
//
// Every filesystem call costs a trip through libuv's thread pool, and on these machines a small write
// also costs several times more kernel time per byte than a large one (test/bench: 64 KiB writes
// ~0.7 s of CPU per GiB, 1 MiB ones ~0.22 s). A fill's chunks are the socket's 64 KiB reads. So chunks
// queue, and one flush at a time writes what has gathered with a single pwritev once there is at
// least MIN_BATCH of it, or after BATCH_DELAY_MS when less comes (a slow upstream still gets its bytes
// to the file, and to the clients that follow it, within a millisecond or two). push() resolves while
// less than WINDOW is waiting, so the caller takes its next chunk while earlier ones land.
import type { FileHandle } from 'node:fs/promises'

const MIN_BATCH = 256 * 1024
const BATCH_DELAY_MS = 1
const WINDOW = 4 * 1024 * 1024
/** Chunks in one pwritev (Linux's IOV_MAX). */
const MAX_IOVECS = 1024

export class WriteQueue {
  /** Bytes in the file. */
  written = 0
  /** The first error; once set, nothing more is written. */
  failure: unknown
  private queue: Uint8Array[] = []
  /** Bytes queued and not yet being written. */
  private waiting = 0
  /** Bytes accepted and not yet in the file. */
  private unwritten = 0
  private flushing: Promise<void> | undefined
  private timer: NodeJS.Timeout | undefined
  private roomWaiters: Array<() => void> = []

  /** More than WINDOW is waiting for the file: push() resolves only once it is under again. */
  get full (): boolean { return this.unwritten > WINDOW }

  /** `onWritten` runs each time `written` grows. */
  constructor (private readonly fh: FileHandle, private readonly onWritten: () => void) {}

  /** Queues a chunk, which must not change afterwards. Resolves when there is room for more. */
  async push (chunk: Uint8Array): Promise<void> {
    if (this.failure !== undefined) throw this.failure
    if (chunk.length === 0) return
    this.queue.push(chunk)
    this.waiting += chunk.length
    this.unwritten += chunk.length
    if (this.flushing === undefined) {
      // The first bytes go out at once: clients following the file are waiting for their first byte.
      if (this.waiting >= MIN_BATCH || this.written === 0) this.startFlush(true)
      else this.arm()
    }
    if (this.unwritten <= WINDOW) return
    await new Promise<void>((resolve, reject) => {
      const check = (): void => {
        if (this.failure !== undefined) reject(this.failure)
        else if (this.unwritten <= WINDOW) resolve()
        else this.roomWaiters.push(check)
      }
      this.roomWaiters.push(check)
    })
  }

  /** Resolves once every queued chunk is in the file, or the queue has failed. */
  async settled (): Promise<void> {
    this.disarm()
    for (;;) {
      if (this.flushing !== undefined) { await this.flushing; continue }
      if (this.queue.length === 0 || this.failure !== undefined) return
      this.startFlush(true)
    }
  }

  /** Stops writing: what is queued is dropped, and waiting pushes reject with `err`. */
  fail (err: unknown): void {
    this.failure ??= err
    this.disarm()
    this.wakeRoom()
  }

  private startFlush (all: boolean): void {
    this.disarm()
    this.flushing = this.flush(all)
  }

  private arm (): void {
    if (this.timer !== undefined) return
    this.timer = setTimeout(() => {
      this.timer = undefined
      if (this.flushing === undefined && this.queue.length > 0 && this.failure === undefined) this.startFlush(true)
    }, BATCH_DELAY_MS)
    this.timer.unref()
  }

  private disarm (): void {
    clearTimeout(this.timer)
    this.timer = undefined
  }

  private async flush (all: boolean): Promise<void> {
    while (this.queue.length > 0 && this.failure === undefined && (all || this.waiting >= MIN_BATCH)) {
      all = false
      const batch = this.queue.length <= MAX_IOVECS ? this.queue : this.queue.slice(0, MAX_IOVECS)
      this.queue = this.queue.length <= MAX_IOVECS ? [] : this.queue.slice(MAX_IOVECS)
      let bytes = 0
      for (const b of batch) bytes += b.length
      this.waiting -= bytes
      try {
        await writeFully(this.fh, batch, this.written)
        this.written += bytes
        this.unwritten -= bytes
        this.onWritten()
      } catch (err) {
        this.failure ??= err
      }
      this.wakeRoom()
    }
    this.flushing = undefined
    if (this.queue.length > 0 && this.failure === undefined) this.arm()
    this.wakeRoom()
  }

  private wakeRoom (): void {
    const w = this.roomWaiters
    this.roomWaiters = []
    for (const f of w) f()
  }
}

/** Writes `bufs` at `pos`, following partial writes to the end. */
async function writeFully (fh: FileHandle, bufs: Uint8Array[], pos: number): Promise<void> {
  let rest = bufs
  for (;;) {
    const { bytesWritten } = await fh.writev(rest, pos)
    pos += bytesWritten
    let n = bytesWritten
    let i = 0
    while (i < rest.length && n >= rest[i]!.length) { n -= rest[i]!.length; i++ }
    if (i === rest.length) return
    if (bytesWritten === 0) throw new Error('the file took no bytes')
    rest = [rest[i]!.subarray(n), ...rest.slice(i + 1)]
  }
}
