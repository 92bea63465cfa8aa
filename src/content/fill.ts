import { open, type FileHandle } from 'node:fs/promises'
import { finished, Readable } from 'node:stream'
import type { Digest } from '../oci/digest.js'
import type { ByteRange } from '../oci/range.js'
import type { BlobInfo, BlobMeta, BlobStore, BlobWriter } from '../store/types.js'
import { ChunkPool } from '../store/file-stream.js'
import { NotFoundError, VerificationError, blobUnknown } from '../errors.js'

/** Bytes a reader takes from the file per read: about 1 MiB, as the NOTES measure. */
const CHUNK = 1024 * 1024

/** One way to get a blob's bytes: a peer that holds it or is filling it, a peer that fetches it for us, or the upstream. */
export interface FillSource {
  /** `peer:<id>`, `delegate:<id>` or `upstream:<name>`; used in logs and metrics. */
  readonly label: string
  /** Where the bytes come from: the metrics label for them. `delegate` is a peer fetching on our behalf. */
  readonly kind: 'peer' | 'delegate' | 'upstream'
  /** The peer behind this source: once it has failed this fill, its other sources are skipped. */
  readonly peer?: string
  /** Readers may stream this source's bytes before verification (the last byte always waits for it). */
  readonly streamable: boolean
  /** The source can continue an attempt another source broke off: `open` honours `from.start`. */
  readonly resumable?: boolean
  /**
   * Below this rate (bytes per second, averaged over windowMs) the transfer is cut off and the next
   * source continues: a peer that trickles must not hold a fill, and every client waiting on it, forever.
   */
  readonly minRate?: { bytesPerSec: number, windowMs: number }
  /**
   * Opens the body. Undefined means the source does not have it (try the next one). With `from`, only
   * the bytes from `from.start` of a blob of `from.size` bytes are wanted; a source that sends the whole
   * blob instead says so with `start: 0`.
   */
  open (signal: AbortSignal, from?: { start: number, size: number }): Promise<{ body: Readable, size: number, start?: number } | undefined>
  /** Called when this source failed (wrong bytes, stall, error), before the next one is tried. */
  onFailure?: (err: unknown) => void
  /** Called when the source answered that it does not have the blob. */
  onMissing?: () => void
  onSuccess?: () => void
  /** Counts bytes as the fill takes them (never attach a 'data' listener: it would start the flow early). */
  onBytes?: (n: number) => void
}

/** A source sent more bytes than the blob has. */
export class SourceOverrunError extends Error {
  override readonly name = 'SourceOverrunError'
  readonly code = 'PM_SOURCE_OVERRUN'
}

/** A source sent less than its minimum rate. */
export class TransferTooSlowError extends Error {
  override readonly name = 'TransferTooSlowError'
  readonly code = 'PM_TRANSFER_TOO_SLOW'
}

export type FillState = 'running' | 'done' | 'failed'

/** One try at one source: its temp file, written by the fill and read (positionally) by readers. */
interface Attempt {
  readonly writer: BlobWriter
  /** The readers' handle on the temp file (opened alongside the first bytes: readers at the head need none). */
  readonly fh: Promise<FileHandle>
  readonly streamable: boolean
  refs: number
  ended: boolean
  ok: boolean
  /** The file handle is closed (or closing): readers must not take this attempt. */
  closed: boolean
  /** endAttempt has begun. */
  ending: boolean
  /** Bytes handed to the writer so far: where a resumed transfer continues. */
  accepted: number
  readonly size: number
  /**
   * The bytes [memStart, accepted) of a streamed source, as the chunks the source gave: the last ones,
   * which the file may not hold yet. A reader at the head takes them from here the moment they arrive,
   * instead of waiting for the write and then reading them back (two trips through libuv's pool, and a
   * batch delay, before each byte reached a client). Chunks go once the file has held them for CHUNK
   * bytes, so this holds at most CHUNK more than the writer itself does (its window, WINDOW in
   * write-queue.ts).
   */
  readonly mem: Buffer[]
  memStart: number
}

/**
 * Drops the held chunks the file has held for a while (readers up to CHUNK behind the writes still take
 * them from memory), but the blob's last one: readers at the head hold back its last byte until the blob
 * verifies, and then take it from here rather than from the file.
 */
function trimMem (a: Attempt): void {
  const keepFrom = a.writer.bytesWritten - CHUNK
  let i = 0
  while (i < a.mem.length && a.memStart + a.mem[i]!.length <= keepFrom && a.memStart + a.mem[i]!.length < a.size) a.memStart += a.mem[i++]!.length
  if (i > 0) a.mem.splice(0, i)
}

/** The held bytes from `pos` (memStart <= pos < accepted) up to `limit`, from one chunk. */
function memSlice (a: Attempt, pos: number, limit: number): Buffer {
  let at = a.memStart
  for (const c of a.mem) {
    if (pos < at + c.length) {
      const from = pos - at
      const to = Math.min(c.length, limit - at)
      return from === 0 && to === c.length ? c : c.subarray(from, to)
    }
    at += c.length
  }
  throw new Error(`bytes at ${pos} are neither held nor in the file`)
}

/** How a copy ended: committed, or failed (and whether the attempt can be continued by another source). */
type CopyResult = { ok: true } | { ok: false, error: unknown, resumable: Attempt | undefined }

/**
 * One cache fill of one digest, shared by every client that asks for it while it runs.
 *
 * The fill writes the body into the store's temp file; readers stream that growing file. The upstream
 * is read once and at its own pace, a slow or departed client slows or cancels nothing, and nothing is
 * buffered whole. A reader never sends the last byte of its range before the whole blob has verified,
 * so a fill that breaks or fails verification ends every reader with an error (an aborted response),
 * never a short or wrong body.
 *
 * Sources are tried in order. A source that is not streamable (a peer) is verified in full before any
 * reader sees its bytes, so a lying or stalling peer costs time, never correctness: the next source is
 * tried, and readers that have sent nothing carry on with it.
 */
export class Fill {
  state: FillState = 'running'
  size: number | undefined
  error: unknown
  info: BlobInfo | undefined
  /** Content pulled with credentials: not served to peers. */
  readonly isPrivate: boolean
  /** The source that wrote the bytes (set when the fill is done). */
  source: FillSource | undefined
  private current: Attempt | undefined
  private active: FillSource | undefined
  private waiters: Array<() => void> = []
  private readonly sized: Promise<number>
  private resolveSize!: (n: number) => void
  private rejectSize!: (e: unknown) => void

  constructor (
    readonly digest: Digest,
    private readonly store: BlobStore,
    private readonly meta: BlobMeta,
  ) {
    this.isPrivate = meta.private === true
    this.sized = new Promise<number>((resolve, reject) => { this.resolveSize = resolve; this.rejectSize = reject })
    this.sized.catch(() => {})
  }

  /** `upstream/repo` the fill was started for (its sources fetch through that repo). */
  get repo (): string | undefined { return this.meta.repo }

  /** Resolves with the blob's size once a source has answered with it; rejects if every source failed. */
  whenSized (): Promise<number> { return this.sized }

  /** Resolves when the fill has ended, either way. */
  async whenEnded (): Promise<void> {
    while (this.state === 'running') await this.changed()
  }

  /** Runs the fill to its end. Never throws: the outcome is in `state`, `info` and `error`. */
  async run (sources: FillSource[], signal: AbortSignal): Promise<void> {
    let lastError: unknown
    /** An attempt whose source broke off mid-transfer: the next resumable source continues it. */
    let broken: Attempt | undefined
    const failedPeers = new Set<string>()
    for (const src of sources) {
      if (signal.aborted) { lastError = signal.reason; break }
      if (src.peer !== undefined && failedPeers.has(src.peer)) continue
      this.active = src
      const resumeAt = broken !== undefined && src.resumable === true ? broken.accepted : 0
      if (broken !== undefined && resumeAt === 0) { await this.endAttempt(broken); broken = undefined }
      let opened: { body: Readable, size: number, start?: number } | undefined
      try {
        opened = await src.open(signal, broken !== undefined ? { start: resumeAt, size: broken.size } : undefined)
      } catch (err) {
        src.onFailure?.(err)
        if (src.peer !== undefined) failedPeers.add(src.peer)
        lastError = err
        continue
      }
      if (opened === undefined) { src.onMissing?.(); continue }
      // The body can fail before the copy starts reading it; the copy sees that error through
      // the stream's errored state, so a listener must be there to keep it from being uncaught.
      opened.body.on('error', () => {})
      // Only a size readers may already have been told of is binding (a failed peer's claim is not).
      if (this.size !== undefined && this.size !== opened.size) {
        opened.body.destroy()
        const err = new VerificationError(`source ${src.label} reports size ${opened.size}, expected ${this.size}`, this.digest)
        src.onFailure?.(err)
        lastError = err
        continue
      }
      // A source that sent the whole blob instead of the rest starts a fresh attempt.
      if (broken !== undefined && (opened.start ?? 0) !== resumeAt) { await this.endAttempt(broken); broken = undefined }
      const r = await this.copy(opened.body, opened.size, src, signal, broken)
      broken = undefined
      if (r.ok) {
        src.onSuccess?.()
        this.source = src
        this.state = 'done'
        this.wake()
        return
      }
      src.onFailure?.(r.error)
      if (src.peer !== undefined) failedPeers.add(src.peer)
      lastError = r.error
      broken = r.resumable
    }
    if (broken !== undefined) await this.endAttempt(broken)
    this.error = lastError ?? new NotFoundError(`no source has ${this.digest}`)
    this.state = 'failed'
    this.rejectSize(this.error)
    this.wake()
  }

  /**
   * Copies one source's body into a temp file: a fresh one, or the one `resume` broke off (the body
   * then carries the bytes from `resume.accepted` on). A transfer that breaks off mid-way leaves its
   * attempt open for the next source; one that fails verification, or a write, ends it.
   */
  private async copy (body: Readable, size: number, src: FillSource, signal: AbortSignal, resume?: Attempt): Promise<CopyResult> {
    const onAbort = (): void => { body.destroy(signal.reason instanceof Error ? signal.reason : new Error('aborted')) }
    signal.addEventListener('abort', onAbort, { once: true })
    let att: Attempt | undefined = resume
    let keep = false
    try {
      if (att === undefined) {
        // Readers of a streamed source follow the bytes as they reach the file.
        let created: Attempt | undefined
        const writer = await this.store.createWriter(this.digest, {
          expectedSize: size,
          onProgress: () => { if (created?.streamable === true) { trimMem(created); this.wake() } },
        })
        const fh = open(writer.tempPath, 'r')
        // A file we cannot read back fails this attempt as a write would (readers behind see it too).
        fh.catch((err: unknown) => { body.destroy(new WriteFailedError(err)) })
        created = { writer, fh, streamable: src.streamable, refs: 1, ended: false, ending: false, ok: false, closed: false, accepted: 0, size, mem: [], memStart: 0 }
        att = created
        this.current = att
        // A streamed source's size goes out in response headers now; another only once its bytes verified.
        if (src.streamable) this.publishSize(size)
        this.wake()
      }
      const a = att
      let pumped: unknown
      try {
        await pump(body, a.writer, a.size - a.accepted, chunk => {
          a.accepted += chunk.length
          src.onBytes?.(chunk.length)
          // Readers at the head may send it now (never the last byte before verification, see createReader).
          if (a.streamable) { a.mem.push(chunk); this.wake() }
        }, src.minRate)
      } catch (err) {
        pumped = err
      }
      if (pumped !== undefined) {
        body.destroy()
        // The source broke off: what was accepted is in the file, and the next source may continue it,
        // unless the writer itself failed (its error comes back from commit or write) or we are stopping.
        keep = !signal.aborted && !isWriteError(pumped)
        return { ok: false, error: pumped instanceof WriteFailedError ? pumped.original : pumped, resumable: keep ? a : undefined }
      }
      this.info = await a.writer.commit(this.meta, () => {
        // Verified: readers may send the last bytes from the temp file while the store fsyncs and indexes.
        a.ok = true
        this.publishSize(size)
        this.wake()
      })
      return { ok: true }
    } catch (error) {
      body.destroy()
      return { ok: false, error, resumable: undefined }
    } finally {
      signal.removeEventListener('abort', onAbort)
      if (att !== undefined && !keep) await this.endAttempt(att)
      this.wake()
    }
  }

  /** Ends an attempt: its temp file is discarded unless it committed; readers that took bytes from it fail. */
  private async endAttempt (att: Attempt): Promise<void> {
    if (att.ending) return
    att.ending = true
    // The temp file goes first: a reader that fails on this attempt's end finds it gone already.
    if (!att.ok) await att.writer.abort().catch(() => {})
    att.mem.length = 0
    att.ended = true
    if (this.current === att && !att.ok) this.current = undefined
    this.release(att)
    this.wake()
  }

  /** The source being tried right now (undefined before the first and after the end). */
  activeSource (): FillSource | undefined {
    return this.state === 'running' ? this.active : undefined
  }

  private publishSize (size: number): void {
    if (this.size !== undefined) return
    this.size = size
    this.resolveSize(size)
  }

  private release (att: Attempt): void {
    att.refs--
    if (att.refs === 0 && att.ended) {
      att.closed = true
      att.fh.then(async fh => { await fh.close() }).catch(() => {})
    }
  }

  private wake (): void {
    const w = this.waiters
    this.waiters = []
    for (const f of w) f()
  }

  private changed (): Promise<void> {
    return new Promise(resolve => this.waiters.push(resolve))
  }

  /**
   * A stream of the blob (or of `range`) that follows the fill, and errors if the fill fails.
   * Call after `whenSized()`. Destroying it (a client that went away) does not touch the fill.
   */
  createReader (range?: ByteRange): Readable {
    const fill = this
    let att: Attempt | undefined
    let pos = range?.start ?? 0
    let sent = 0
    let busy = false
    let delegate: AsyncIterator<Buffer> | undefined
    let delegateStream: (Readable & { recycle?: (chunk: Buffer) => void }) | undefined
    // Buffers handed back by the consumer (see recycle below) are read into again.
    const pool = new ChunkPool()
    const end = (): number => range !== undefined ? range.end + 1 : fill.size!

    const take = (a: Attempt | undefined): void => {
      if (att !== undefined) fill.release(att)
      att = a !== undefined && !a.closed ? a : undefined
      if (att !== undefined) att.refs++
    }
    take(this.current)

    const stream = new Readable({
      highWaterMark: CHUNK,
      read () {
        if (busy) return
        busy = true
        void (async () => {
          try {
            for (;;) {
              // Destroyed while this loop waited (a client that went away before its first chunk): let go
              // of whatever was taken since, so that no attempt or stored blob stays held open by it.
              if (this.destroyed) { take(undefined); delegateStream?.destroy(); return }
              if (delegate !== undefined) {
                const r = await delegate.next()
                if (r.done === true) { this.push(null); return }
                if (!this.push(r.value)) return
                continue
              }
              const e = end()
              // A reader ends only once the whole blob has verified, even when its range is done (or empty).
              if (pos >= e) {
                if (fill.state === 'done' || fill.info !== undefined || att?.ok === true) { this.push(null); return }
                if (fill.state === 'failed') throw fill.error
                await fill.changed()
                continue
              }
              if (att === undefined || (att.ended && !att.ok)) {
                if (fill.state === 'failed') throw fill.error
                if (sent > 0) throw fill.error ?? new Error('the fill lost its source mid-stream')
                if (fill.state === 'done' || fill.info !== undefined) {
                  // The attempt that succeeded has let go of its file: read the stored blob instead.
                  take(undefined)
                  const s = await fill.store.createReadStream(fill.digest, { start: pos, end: e - 1 })
                  // Evicted between the fill's end and this read (a budget under pressure): the client may retry.
                  if (s === undefined) throw blobUnknown({ digest: fill.digest, reason: 'evicted while being requested; retry' })
                  if (this.destroyed) { s.destroy(); return }
                  delegateStream = s
                  delegate = s[Symbol.asyncIterator]() as AsyncIterator<Buffer>
                  continue
                }
                if (fill.current !== att && fill.current !== undefined) { take(fill.current); continue }
                await fill.changed()
                continue
              }
              const verified = att.ok
              // A streamed source's bytes may go out as they arrive; the last one only once the blob verified.
              const limit = verified ? e : (att.streamable ? Math.min(att.accepted, e - 1) : pos)
              const inFile = att.writer.bytesWritten
              // Not before the first write succeeded: a disk that is full from the start fails the fill
              // before any client got a byte, so each is told why (507) rather than cut off.
              if (pos < limit && pos >= att.memStart && att.mem.length > 0 && inFile > 0) {
                // At the head: the bytes are held in memory (the file may not have them yet).
                const chunk = memSlice(att, pos, limit)
                pos += chunk.length
                sent += chunk.length
                if (!this.push(chunk)) return
                continue
              }
              const available = Math.min(limit, verified ? e : inFile)
              if (pos < available) {
                const n = Math.min(CHUNK, available - pos)
                // A pooled buffer is never shorter than n: reads only shrink towards the end.
                const buf = pool.take(Math.min(CHUNK, e - pos))
                const { bytesRead } = await (await att.fh).read(buf, 0, n, pos)
                if (bytesRead === 0) throw new Error('cached file ended early')
                pos += bytesRead
                sent += bytesRead
                const chunk = bytesRead === buf.length ? buf : buf.subarray(0, bytesRead)
                pool.lend(chunk, buf)
                if (!this.push(chunk)) return
                continue
              }
              if (fill.state === 'failed') throw fill.error
              await fill.changed()
            }
          } catch (err) {
            this.destroy(err instanceof Error ? err : new Error(String(err)))
          } finally {
            busy = false
          }
        })()
      },
      destroy (err, cb) {
        take(undefined)
        pool.clear()
        void delegate?.return?.()
        cb(err)
      },
    })
    // The consumer is done with `chunk` (the socket has its bytes): its buffer may be read into again.
    // The same contract as the store's streams (src/store/file-stream.ts); unknown chunks are ignored.
    return Object.assign(stream, {
      recycle (chunk: Buffer): void {
        if (!pool.recycle(chunk)) delegateStream?.recycle?.(chunk)
      },
    })
  }
}

/**
 * Moves a body into the writer with 'data' events, pausing only while the writer is full: about a
 * thousand chunks per 64 MiB, where an async iterator's per-chunk promises cost measurably more.
 * With `minRate`, a body that delivers less than that over a window is destroyed (TransferTooSlowError);
 * time spent waiting on our own writer does not count against the source.
 */
async function pump (body: Readable, writer: BlobWriter, limit: number, onChunk: (chunk: Buffer) => void, minRate?: { bytesPerSec: number, windowMs: number }): Promise<void> {
  await new Promise<void>((resolve, reject) => {
    let failed = false
    let total = 0
    let windowBytes = 0
    let paused = false
    const timer = minRate === undefined
      ? undefined
      : setInterval(() => {
        const need = minRate.bytesPerSec * minRate.windowMs / 1000
        if (!paused && windowBytes < need) body.destroy(new TransferTooSlowError(`fewer than ${need} bytes in ${minRate.windowMs} ms`))
        windowBytes = 0
      }, minRate.windowMs)
    timer?.unref()
    const fail = (err: unknown): void => {
      if (failed) return
      failed = true
      if (timer !== undefined) clearInterval(timer)
      body.off('data', onData)
      reject(err)
    }
    const onData = (chunk: Buffer): void => {
      total += chunk.length
      // More than the blob's size: the source's fault, not our writer's (which would refuse it too).
      if (total > limit) { body.destroy(new SourceOverrunError(`the source sent more than the ${limit} bytes expected`)); return }
      windowBytes += chunk.length
      onChunk(chunk)
      const p = writer.write(chunk).catch((err: unknown) => { throw new WriteFailedError(err) })
      if (writer.full) {
        body.pause()
        paused = true
        p.then(() => { paused = false; if (!failed) body.resume() }, fail)
      } else {
        p.catch(fail)
      }
    }
    body.on('data', onData)
    // finished() also reports a body destroyed without an error (a premature close).
    finished(body, { writable: false }, err => {
      if (err !== undefined && err !== null) { fail(err); return }
      if (timer !== undefined) clearInterval(timer)
      if (!failed) resolve()
    })
  })
}

/** Our own write failed (disk full, I/O error): not the source's fault, and the attempt cannot go on. */
class WriteFailedError extends Error {
  override readonly name = 'WriteFailedError'
  readonly code: string
  constructor (readonly original: unknown) {
    super((original as Error)?.message ?? String(original))
    this.code = (original as { code?: string })?.code ?? 'PM_WRITE_FAILED'
  }
}

function isWriteError (err: unknown): boolean {
  return err instanceof WriteFailedError
}
