import { open, type FileHandle } from 'node:fs/promises'
import { finished, Readable } from 'node:stream'
import type { Digest } from '../oci/digest.js'
import type { ByteRange } from '../oci/range.js'
import type { BlobInfo, BlobMeta, BlobStore, BlobWriter } from '../store/types.js'
import { ChunkPool } from '../store/file-stream.js'
import { NotFoundError, VerificationError } from '../errors.js'

/** Bytes a reader takes from the file per read: about 1 MiB, as the NOTES measure. */
const CHUNK = 1024 * 1024

/** One way to get a blob's bytes: a peer or the upstream. */
export interface FillSource {
  /** `peer:<id>` or `upstream:<name>`; used in logs and metrics. */
  readonly label: string
  /** `peer` or `upstream`: the metrics label for bytes from it. */
  readonly kind: 'peer' | 'upstream'
  /** Readers may stream this source's bytes before verification (the upstream: yes; peers: no). */
  readonly streamable: boolean
  /** Opens the body. Undefined means the source does not have it (try the next one). */
  open (signal: AbortSignal): Promise<{ body: Readable, size: number } | undefined>
  /** Called when this source failed (wrong bytes, stall, error), before the next one is tried. */
  onFailure?: (err: unknown) => void
  onSuccess?: () => void
  /** Counts bytes as the fill takes them (never attach a 'data' listener: it would start the flow early). */
  onBytes?: (n: number) => void
}

export type FillState = 'running' | 'done' | 'failed'

/** One try at one source: its temp file, written by the fill and read (positionally) by readers. */
interface Attempt {
  readonly writer: BlobWriter
  readonly fh: FileHandle
  readonly streamable: boolean
  refs: number
  ended: boolean
  ok: boolean
  /** The file handle is closed (or closing): readers must not take this attempt. */
  closed: boolean
}

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

  /** Resolves with the blob's size once a source has answered with it; rejects if every source failed. */
  whenSized (): Promise<number> { return this.sized }

  /** Resolves when the fill has ended, either way. */
  async whenEnded (): Promise<void> {
    while (this.state === 'running') await this.changed()
  }

  /** Runs the fill to its end. Never throws: the outcome is in `state`, `info` and `error`. */
  async run (sources: FillSource[], signal: AbortSignal): Promise<void> {
    let lastError: unknown
    for (const src of sources) {
      if (signal.aborted) { lastError = signal.reason; break }
      let opened: { body: Readable, size: number } | undefined
      try {
        opened = await src.open(signal)
      } catch (err) {
        src.onFailure?.(err)
        lastError = err
        continue
      }
      if (opened === undefined) continue
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
      const error = await this.copy(opened.body, opened.size, src, signal)
      if (error === undefined) {
        src.onSuccess?.()
        this.source = src
        this.state = 'done'
        this.wake()
        return
      }
      src.onFailure?.(error)
      lastError = error
      // A streamed attempt may have handed unverified bytes to readers, who cannot switch sources.
      if (src.streamable) break
    }
    this.error = lastError ?? new NotFoundError(`no source has ${this.digest}`)
    this.state = 'failed'
    this.rejectSize(this.error)
    this.wake()
  }

  /** Copies one source's body into a fresh temp file. Returns the error, or undefined when committed. */
  private async copy (body: Readable, size: number, src: FillSource, signal: AbortSignal): Promise<unknown> {
    const onAbort = (): void => { body.destroy(signal.reason instanceof Error ? signal.reason : new Error('aborted')) }
    signal.addEventListener('abort', onAbort, { once: true })
    let att: Attempt | undefined
    let writer: BlobWriter | undefined
    try {
      // Readers of a streamed source follow the bytes as they reach the file.
      writer = await this.store.createWriter(this.digest, { expectedSize: size, onProgress: () => { if (att?.streamable === true) this.wake() } })
      const fh = await open(writer.tempPath, 'r')
      att = { writer, fh, streamable: src.streamable, refs: 1, ended: false, ok: false, closed: false }
      this.current = att
      // A streamed source's size goes out in response headers now; a peer's only once its bytes verified.
      if (src.streamable) this.publishSize(size)
      this.wake()
      await pump(body, writer, src.onBytes)
      const verifying = att
      this.info = await writer.commit(this.meta, () => {
        // Verified: readers may send the last bytes from the temp file while the store fsyncs and indexes.
        verifying.ok = true
        this.publishSize(size)
        this.wake()
      })
      return undefined
    } catch (error) {
      body.destroy()
      await writer?.abort().catch(() => {})
      return error
    } finally {
      signal.removeEventListener('abort', onAbort)
      if (att !== undefined) {
        att.ended = true
        if (this.current === att && !att.ok) this.current = undefined
        this.release(att)
      }
      this.wake()
    }
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
      void att.fh.close().catch(() => {})
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
                  if (s === undefined) throw new Error('blob vanished from the store after its fill')
                  delegateStream = s
                  delegate = s[Symbol.asyncIterator]() as AsyncIterator<Buffer>
                  continue
                }
                if (fill.current !== att && fill.current !== undefined) { take(fill.current); continue }
                await fill.changed()
                continue
              }
              const verified = att.ok
              const available = verified ? e : (att.streamable ? Math.min(att.writer.bytesWritten, e - 1) : pos)
              if (pos < available) {
                const n = Math.min(CHUNK, available - pos)
                // A pooled buffer is never shorter than n: reads only shrink towards the end.
                const buf = pool.take(Math.min(CHUNK, e - pos))
                const { bytesRead } = await att.fh.read(buf, 0, n, pos)
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
 */
async function pump (body: Readable, writer: BlobWriter, onBytes?: (n: number) => void): Promise<void> {
  await new Promise<void>((resolve, reject) => {
    let failed = false
    const fail = (err: unknown): void => {
      if (failed) return
      failed = true
      body.off('data', onData)
      reject(err)
    }
    const onData = (chunk: Buffer): void => {
      onBytes?.(chunk.length)
      const p = writer.write(chunk)
      if (writer.full) {
        body.pause()
        p.then(() => { if (!failed) body.resume() }, fail)
      } else {
        p.catch(fail)
      }
    }
    body.on('data', onData)
    // finished() also reports a body destroyed without an error (a premature close).
    finished(body, { writable: false }, err => { if (err !== undefined && err !== null) fail(err); else if (!failed) resolve() })
  })
}
