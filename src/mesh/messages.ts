// Wire formats of the mesh control plane: gossip announcements and inventory frames.
// Everything here is pure: encode to bytes, decode (size-bounded, versioned, schema-checked) from bytes.
import { z } from 'zod'
import { tryParseDigest, type Digest } from '../oci/digest.js'

export const ANNOUNCE_TOPIC = '/pullmesh/announce/1'
export const INVENTORY_PROTOCOL = '/pullmesh/inventory/1.0.0'
export const WIRE_VERSION = 1

/** Gossip messages larger than this are dropped before parsing. */
export const MAX_GOSSIP_BYTES = 64 * 1024
/** Encoders aim below this, leaving headroom under MAX_GOSSIP_BYTES. */
const GOSSIP_BUDGET = 60 * 1024
/** One inventory frame (one JSON line) may not exceed this. */
export const MAX_FRAME_BYTES = 256 * 1024
/** Entries per inventory frame. */
export const FRAME_ENTRIES = 1000

export interface BlobEntry { digest: Digest, size: number, mediaType: string }
export interface TagEntry { upstream: string, repo: string, tag: string, record: { digest: Digest, mediaType: string, size: number, verifiedAt: number } }

export type GossipMessage =
  | { v: 1, t: 'add', blobs: BlobEntry[] }
  | { v: 1, t: 'remove', digests: Digest[], all: boolean }
  | { v: 1, t: 'tag', entry: TagEntry }
  | { v: 1, t: 'hello', dataPort: number, upstreams?: string[], addrs?: string[] }
  /** A fill in progress that peers may stream from (its size is known); short-lived, never batched. */
  | { v: 1, t: 'filling', digest: Digest, size: number, ttlMs: number }
  /** The fill announced by `filling` ended without the blob (an `add` follows instead when it succeeded). */
  | { v: 1, t: 'unfilling', digest: Digest }

export type InventoryFrame =
  /** Request (requester → responder): `epoch`/`gen` of the last complete inventory it holds from the responder. */
  | { v: 1, t: 'req', epoch?: string, gen?: number, delta?: boolean }
  /** First response frame. The responder's holdings change whenever `gen` changes; `epoch` changes per process. */
  | { v: 1, t: 'inv', dataPort: number, epoch: string, gen: number, upstreams?: string[] }
  | { v: 1, t: 'blobs', blobs: BlobEntry[] }
  | { v: 1, t: 'tags', tags: TagEntry[] }
  /** Last frame: counts for a completeness check, or `same` when nothing changed since the requester's epoch/gen. */
  | { v: 1, t: 'end', blobs: number, tags: number, same: boolean, delta?: boolean, gone?: number }
  /** In a delta: entries the responder no longer holds since the requester's epoch/gen. */
  | { v: 1, t: 'gone', blobs: Digest[], tags: TagName[] }

export interface TagName { upstream: string, repo: string, tag: string }

/**
 * Where a gossip message sits in its signer's sequence: `epoch` grows across the signer's restarts,
 * `seq` counts its messages within an epoch. Every gossip message type carries it (stampOrigin), so
 * that a receiver can drop replays: see ReplayGuard in announce.ts.
 */
export interface GossipOrigin { epoch: number, seq: number }

export type DecodeResult<T> = { ok: true, value: T } | { ok: false, reason: 'too-large' | 'not-json' | 'version' | 'schema' | 'origin' | 'unknown-type' }

// ---- schemas -------------------------------------------------------------------------------

const digest = z.string().max(200).transform((s, ctx) => {
  const d = tryParseDigest(s)
  if (d === undefined) { ctx.addIssue({ code: z.ZodIssueCode.custom, message: 'bad digest' }); return z.NEVER }
  return d
})
const size = z.number().int().nonnegative().max(Number.MAX_SAFE_INTEGER)
const mediaType = z.string().max(255)
const port = z.number().int().min(1).max(65535)
const name = z.string().min(1).max(255)

/** add/blobs use a media-type table to keep messages small: blobs are [digest, size, mediaTypeIndex]. */
const blobTable = z.object({
  m: z.array(mediaType).max(256),
  b: z.array(z.tuple([digest, size, z.number().int().nonnegative()])).max(5000),
}).transform((o, ctx) => {
  const out: BlobEntry[] = []
  for (const [d, s, i] of o.b) {
    const mt = o.m[i]
    if (mt === undefined) { ctx.addIssue({ code: z.ZodIssueCode.custom, message: 'bad media type index' }); return z.NEVER }
    out.push({ digest: d, size: s, mediaType: mt })
  }
  return out
})

const tagEntry = z.object({
  upstream: name,
  repo: name,
  tag: z.string().min(1).max(128),
  record: z.object({ digest, mediaType, size, verifiedAt: z.number().int().nonnegative() }),
})

/** Upstream ids (see upstreamId in src/content/delegation.ts): which upstreams a node fetches for the mesh. */
const upstreamIds = z.array(z.string().regex(/^[0-9a-f]{16}$/)).max(64)
/** Listen addresses a hello may carry (peer exchange). */
export const MAX_HELLO_ADDRS = 8
/** A `filling` record lives at most this long unless announced again. */
export const MAX_FILLING_TTL_MS = 10 * 60_000

const gossipSchema = z.discriminatedUnion('t', [
  z.object({ t: z.literal('add'), m: z.unknown(), b: z.unknown() }),
  z.object({ t: z.literal('remove'), d: z.array(digest).max(2000).optional(), all: z.boolean().optional() }),
  z.object({ t: z.literal('tag'), upstream: z.unknown(), repo: z.unknown(), tag: z.unknown(), record: z.unknown() }),
  z.object({ t: z.literal('hello'), dataPort: port, u: upstreamIds.optional(), a: z.array(z.string().min(1).max(256)).max(MAX_HELLO_ADDRS).optional() }),
  z.object({ t: z.literal('filling'), digest, size, ttl: z.number().int().min(1).max(MAX_FILLING_TTL_MS) }),
  z.object({ t: z.literal('unfilling'), digest }),
])

const epoch = z.string().min(1).max(64)
const tagName = z.tuple([name, name, z.string().min(1).max(128)])
const frameSchema = z.discriminatedUnion('t', [
  z.object({ t: z.literal('gone'), d: z.array(digest).max(FRAME_ENTRIES), g: z.array(tagName).max(FRAME_ENTRIES) }),
  z.object({ t: z.literal('req'), epoch: epoch.optional(), gen: size.optional(), delta: z.boolean().optional() }),
  z.object({ t: z.literal('inv'), dataPort: port, epoch, gen: size, u: upstreamIds.optional() }),
  z.object({ t: z.literal('blobs'), m: z.unknown(), b: z.unknown() }),
  z.object({ t: z.literal('tags'), tags: z.array(tagEntry).max(FRAME_ENTRIES) }),
  z.object({ t: z.literal('end'), blobs: size, tags: size, same: z.boolean().optional(), delta: z.boolean().optional(), gone: size.optional() }),
])

// ---- decoding ------------------------------------------------------------------------------

function parseVersioned (data: Uint8Array, max: number): DecodeResult<Record<string, unknown>> {
  if (data.byteLength > max) return { ok: false, reason: 'too-large' }
  let json: unknown
  try { json = JSON.parse(Buffer.from(data.buffer, data.byteOffset, data.byteLength).toString('utf8')) } catch { return { ok: false, reason: 'not-json' } }
  if (json === null || typeof json !== 'object' || Array.isArray(json)) return { ok: false, reason: 'schema' }
  const o = json as Record<string, unknown>
  if (o.v !== WIRE_VERSION) return { ok: false, reason: 'version' }
  return { ok: true, value: o }
}

/** `e` and `s` are reserved in every gossip message: the signer's origin (see stampOrigin). */
const originSchema = z.object({ e: size, s: size })

/** Decodes a gossip message together with its origin; a message without a valid origin is refused. */
export function decodeAnnouncement (data: Uint8Array): DecodeResult<{ origin: GossipOrigin, message: GossipMessage }> {
  const p = parseVersioned(data, MAX_GOSSIP_BYTES)
  if (!p.ok) return p
  const o = originSchema.safeParse(p.value)
  if (!o.success) return { ok: false, reason: 'origin' }
  const m = gossipBody(p.value)
  return m.ok ? { ok: true, value: { origin: { epoch: o.data.e, seq: o.data.s }, message: m.value } } : m
}

/** Decodes a gossip message's body (its origin, if any, is not checked: see decodeAnnouncement). */
export function decodeGossip (data: Uint8Array): DecodeResult<GossipMessage> {
  const p = parseVersioned(data, MAX_GOSSIP_BYTES)
  if (!p.ok) return p
  return gossipBody(p.value)
}

function gossipBody (o: Record<string, unknown>): DecodeResult<GossipMessage> {
  // A type this version does not know (a newer peer's) is told apart from a malformed message.
  if (typeof o.t === 'string' && !gossipSchema.optionsMap.has(o.t)) return { ok: false, reason: 'unknown-type' }
  const r = gossipSchema.safeParse(o)
  if (!r.success) return { ok: false, reason: 'schema' }
  const m = r.data
  switch (m.t) {
    case 'add': {
      const b = blobTable.safeParse({ m: m.m, b: m.b })
      return b.success ? { ok: true, value: { v: 1, t: 'add', blobs: b.data } } : { ok: false, reason: 'schema' }
    }
    case 'remove':
      if (m.d === undefined && m.all !== true) return { ok: false, reason: 'schema' }
      return { ok: true, value: { v: 1, t: 'remove', digests: m.d ?? [], all: m.all === true } }
    case 'tag': {
      const e = tagEntry.safeParse(m)
      return e.success ? { ok: true, value: { v: 1, t: 'tag', entry: e.data } } : { ok: false, reason: 'schema' }
    }
    case 'hello':
      return { ok: true, value: { v: 1, t: 'hello', dataPort: m.dataPort, ...(m.u !== undefined ? { upstreams: m.u } : {}), ...(m.a !== undefined ? { addrs: m.a } : {}) } }
    case 'filling':
      return { ok: true, value: { v: 1, t: 'filling', digest: m.digest, size: m.size, ttlMs: m.ttl } }
    case 'unfilling':
      return { ok: true, value: { v: 1, t: 'unfilling', digest: m.digest } }
  }
}

export function decodeFrame (line: Uint8Array): DecodeResult<InventoryFrame> {
  const p = parseVersioned(line, MAX_FRAME_BYTES)
  if (!p.ok) return p
  const r = frameSchema.safeParse(p.value)
  if (!r.success) return { ok: false, reason: 'schema' }
  const f = r.data
  switch (f.t) {
    case 'req': return { ok: true, value: { v: 1, t: 'req', ...(f.epoch !== undefined ? { epoch: f.epoch } : {}), ...(f.gen !== undefined ? { gen: f.gen } : {}), ...(f.delta === true ? { delta: true } : {}) } }
    case 'inv': return { ok: true, value: { v: 1, t: 'inv', dataPort: f.dataPort, epoch: f.epoch, gen: f.gen, ...(f.u !== undefined ? { upstreams: f.u } : {}) } }
    case 'blobs': {
      const b = blobTable.safeParse({ m: f.m, b: f.b })
      return b.success ? { ok: true, value: { v: 1, t: 'blobs', blobs: b.data } } : { ok: false, reason: 'schema' }
    }
    case 'tags': return { ok: true, value: { v: 1, t: 'tags', tags: f.tags } }
    case 'end': return { ok: true, value: { v: 1, t: 'end', blobs: f.blobs, tags: f.tags, same: f.same === true, ...(f.delta === true ? { delta: true, gone: f.gone ?? 0 } : {}) } }
    case 'gone': return { ok: true, value: { v: 1, t: 'gone', blobs: f.d, tags: f.g.map(([upstream, repo, tag]) => ({ upstream, repo, tag })) } }
  }
}

// ---- encoding ------------------------------------------------------------------------------

const enc = (o: unknown): Uint8Array => Buffer.from(JSON.stringify(o), 'utf8')

function table (blobs: BlobEntry[]): { m: string[], b: Array<[string, number, number]> } {
  const m: string[] = []
  const idx = new Map<string, number>()
  const b: Array<[string, number, number]> = []
  for (const e of blobs) {
    let i = idx.get(e.mediaType)
    if (i === undefined) { i = m.length; m.push(e.mediaType); idx.set(e.mediaType, i) }
    b.push([e.digest, e.size, i])
  }
  return { m, b }
}

/** Splits blobs into as few `add` messages as fit under the gossip size limit. */
export function encodeAdds (blobs: BlobEntry[]): Uint8Array[] {
  const out: Uint8Array[] = []
  let batch: BlobEntry[] = []
  let bytes = 64
  const seenTypes = new Set<string>()
  const flush = (): void => {
    if (batch.length > 0) out.push(enc({ v: WIRE_VERSION, t: 'add', ...table(batch) }))
    batch = []; bytes = 64; seenTypes.clear()
  }
  for (const e of blobs) {
    // entry: ["<digest>",<size>,<idx>], plus the media type the first time it appears in this batch
    const cost = e.digest.length + 30 + (seenTypes.has(e.mediaType) ? 0 : e.mediaType.length * 2 + 4)
    if (bytes + cost > GOSSIP_BUDGET || batch.length >= 5000) flush()
    batch.push(e); bytes += cost; seenTypes.add(e.mediaType)
  }
  flush()
  return out
}

export function encodeRemoves (digests: Digest[]): Uint8Array[] {
  const out: Uint8Array[] = []
  for (let i = 0; i < digests.length; i += 500) out.push(enc({ v: WIRE_VERSION, t: 'remove', d: digests.slice(i, i + 500) }))
  return out
}

export const encodeRemoveAll = (): Uint8Array => enc({ v: WIRE_VERSION, t: 'remove', all: true })
export const encodeTag = (e: TagEntry): Uint8Array => enc({ v: WIRE_VERSION, t: 'tag', upstream: e.upstream, repo: e.repo, tag: e.tag, record: e.record })
export const encodeHello = (dataPort: number, upstreams: string[] = [], addrs: string[] = []): Uint8Array =>
  enc({ v: WIRE_VERSION, t: 'hello', dataPort, ...(upstreams.length > 0 ? { u: upstreams } : {}), ...(addrs.length > 0 ? { a: addrs.slice(0, MAX_HELLO_ADDRS) } : {}) })
export const encodeFilling = (digest: Digest, size: number, ttlMs: number): Uint8Array => enc({ v: WIRE_VERSION, t: 'filling', digest, size, ttl: ttlMs })
export const encodeUnfilling = (digest: Digest): Uint8Array => enc({ v: WIRE_VERSION, t: 'unfilling', digest })

/**
 * Adds the signer's origin to any encoded gossip message: `{...,"e":<epoch>,"s":<seq>}`. Appended last,
 * so that it wins over any key of the same name in the body (JSON.parse keeps the last one).
 */
export function stampOrigin (data: Uint8Array, origin: GossipOrigin): Uint8Array {
  if (data.byteLength < 2 || data[0] !== 0x7b || data[data.byteLength - 1] !== 0x7d) throw new TypeError('a gossip message is a JSON object')
  const tail = Buffer.from(`${data.byteLength > 2 ? ',' : ''}"e":${origin.epoch},"s":${origin.seq}}`)
  return Buffer.concat([data.subarray(0, data.byteLength - 1), tail])
}
/** Bytes stampOrigin adds at most. */
export const ORIGIN_BYTES = 48

/** Inventory frames are JSON lines; JSON.stringify never emits a raw newline. */
const line = (o: unknown): Uint8Array => Buffer.from(JSON.stringify(o) + '\n', 'utf8')
/** `delta`: the requester can apply a delta (older requesters cannot, and get a complete inventory). */
export const frameReq = (last?: { epoch: string, gen: number }, delta = false): Uint8Array => line({ v: WIRE_VERSION, t: 'req', ...last, ...(delta ? { delta: true } : {}) })
export const frameInv = (dataPort: number, epoch: string, gen: number, upstreams: string[] = []): Uint8Array => line({ v: WIRE_VERSION, t: 'inv', dataPort, epoch, gen, ...(upstreams.length > 0 ? { u: upstreams } : {}) })
export const frameBlobs = (blobs: BlobEntry[]): Uint8Array => line({ v: WIRE_VERSION, t: 'blobs', ...table(blobs) })
export const frameTags = (tags: TagEntry[]): Uint8Array => line({ v: WIRE_VERSION, t: 'tags', tags })
export const frameEnd = (blobs: number, tags: number, same = false, delta?: { gone: number }): Uint8Array =>
  line({ v: WIRE_VERSION, t: 'end', blobs, tags, same, ...(delta !== undefined ? { delta: true, gone: delta.gone } : {}) })
export const frameGone = (blobs: Digest[], tags: TagName[]): Uint8Array => line({ v: WIRE_VERSION, t: 'gone', d: blobs, g: tags.map(t => [t.upstream, t.repo, t.tag]) })

/** Splits a byte stream into lines, refusing any line longer than maxLine. */
export class LineSplitter {
  private parts: Buffer[] = []
  private pending = 0
  constructor (private readonly maxLine: number) {}

  /** Returns complete lines (without the newline); throws if a line grows beyond the limit. */
  push (chunk: Uint8Array): Buffer[] {
    const lines: Buffer[] = []
    let buf = Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength)
    for (;;) {
      const nl = buf.indexOf(10)
      if (nl === -1) break
      const head = buf.subarray(0, nl)
      if (this.pending + head.length > this.maxLine) throw new FrameTooLargeError()
      lines.push(this.parts.length === 0 ? head : Buffer.concat([...this.parts, head]))
      this.parts = []; this.pending = 0
      buf = buf.subarray(nl + 1)
    }
    if (buf.length > 0) {
      this.pending += buf.length
      if (this.pending > this.maxLine) throw new FrameTooLargeError()
      this.parts.push(Buffer.from(buf)) // copy: the chunk's memory may be reused
    }
    return lines
  }

  get hasPartial (): boolean { return this.pending > 0 }
}

export class FrameTooLargeError extends Error {
  override readonly name = 'FrameTooLargeError'
  readonly code = 'ERR_MESH_FRAME_TOO_LARGE'
  constructor () { super('inventory frame too large') }
}
