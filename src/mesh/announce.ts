// Announcements: the gossipsub topic on which a node says what it holds. Publishing (batched and
// self-limited), validation (signature, size, per-peer rate limits, schema, replay), gossipsub's own
// peer scoring, and applying what peers announce to the index.
import { readFile, rename, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { TopicValidatorResult, type GossipsubOpts, type Message } from '@libp2p/gossipsub'
import { peerIdFromPublicKey } from '@libp2p/peer-id'
import type { PeerId } from '@libp2p/interface'
import type { Logger } from '../logger.js'
import type { Digest } from '../oci/digest.js'
import type { PeerIndex } from './peer-index.js'
import type { HoldingsChange } from './inventory.js'
import {
  ANNOUNCE_TOPIC, MAX_GOSSIP_BYTES, decodeAnnouncement, encodeAdds, encodeRemoves, encodeRemoveAll, encodeTag, encodeHello, stampOrigin,
  type BlobEntry, type GossipMessage, type GossipOrigin, type TagEntry,
} from './messages.js'

const ADD_BATCH_MS = 100
const ADD_BATCH_MAX = 500

// ---- rate limits ---------------------------------------------------------------------------

/** Gossip a node accepts per signer; a forwarder may pass on `forwarderFactor` times as much. */
export interface GossipLimits {
  messagesPerSec: number
  messagesBurst: number
  bytesPerSec: number
  bytesBurst: number
  forwarderFactor: number
}

export const DEFAULT_GOSSIP_LIMITS: GossipLimits = {
  messagesPerSec: 50,
  messagesBurst: 500,
  bytesPerSec: 256 * 1024,
  bytesBurst: 2 * 1024 * 1024,
  forwarderFactor: 4,
}

/** What we publish ourselves stays this far under what receivers accept (timing jitter on the way). */
const SELF_FRACTION = 0.75

/** A token bucket: `rate` tokens per second, at most `burst`. Pure; the clock is passed in. */
export class TokenBucket {
  private tokens: number
  private at: number
  constructor (private readonly rate: number, private readonly burst: number, now: number) {
    this.tokens = burst
    this.at = now
  }

  private refill (now: number): void {
    if (now > this.at) { this.tokens = Math.min(this.burst, this.tokens + (now - this.at) * this.rate / 1000); this.at = now }
  }

  /** Takes n tokens if there are enough. */
  take (n: number, now: number): boolean {
    this.refill(now)
    if (this.tokens < n) return false
    this.tokens -= n
    return true
  }

  /** ms until n tokens are there (n is capped at the burst). */
  waitFor (n: number, now: number): number {
    this.refill(now)
    const need = Math.min(n, this.burst) - this.tokens
    return need <= 0 ? 0 : Math.ceil(need * 1000 / this.rate)
  }

  /** Takes n tokens, going into debt if needed (used after waitFor). */
  spend (n: number, now: number): void {
    this.refill(now)
    this.tokens -= n
  }
}

/** Message and byte buckets per key (signer or forwarder), for at most `maxKeys` keys (least recently used go). */
export class RateLimiter {
  private readonly buckets = new Map<string, { msgs: TokenBucket, bytes: TokenBucket }>()
  constructor (private readonly limits: GossipLimits, private readonly factor = 1, private readonly maxKeys = 4096) {}

  allow (key: string, bytes: number, now: number): boolean {
    let b = this.buckets.get(key)
    if (b === undefined) {
      const l = this.limits
      b = { msgs: new TokenBucket(l.messagesPerSec * this.factor, l.messagesBurst * this.factor, now), bytes: new TokenBucket(l.bytesPerSec * this.factor, l.bytesBurst * this.factor, now) }
      if (this.buckets.size >= this.maxKeys) {
        const oldest = this.buckets.keys().next()
        if (oldest.done !== true) this.buckets.delete(oldest.value)
      }
    } else {
      this.buckets.delete(key) // re-inserted below: most recently used last
    }
    this.buckets.set(key, b)
    // Both buckets are charged only when both allow it.
    if (!b.msgs.take(1, now)) return false
    if (!b.bytes.take(bytes, now)) { b.msgs.spend(-1, now); return false }
    return true
  }
}

// ---- replay protection ---------------------------------------------------------------------

const WINDOW = 64
const WINDOW_MASK = (1n << BigInt(WINDOW)) - 1n

/**
 * Per signer, the newest (epoch, seq) accepted, with a 64-message window below it (as IPsec's
 * anti-replay window) so that messages reordered on the way are still taken once. A message from an
 * older epoch, from before the window, or already taken is a replay. A newer epoch is a restart of
 * the signer: accepted, and the window starts again. Generic: it reads only the origin every gossip
 * message type carries.
 */
export class ReplayGuard {
  private readonly signers = new Map<string, { epoch: number, high: number, mask: bigint }>()
  constructor (private readonly maxSigners = 4096) {}

  accept (signer: string, o: GossipOrigin): boolean {
    const st = this.signers.get(signer)
    if (st === undefined || o.epoch > st.epoch) {
      if (st !== undefined) this.signers.delete(signer)
      else if (this.signers.size >= this.maxSigners) {
        const oldest = this.signers.keys().next()
        if (oldest.done !== true) this.signers.delete(oldest.value)
      }
      this.signers.set(signer, { epoch: o.epoch, high: o.seq, mask: 1n })
      return true
    }
    if (o.epoch < st.epoch) return false
    // most recently active last: the least active signer's state is the one forgotten when full
    this.signers.delete(signer)
    this.signers.set(signer, st)
    if (o.seq > st.high) {
      const shift = o.seq - st.high
      st.mask = shift >= WINDOW ? 1n : ((st.mask << BigInt(shift)) | 1n) & WINDOW_MASK
      st.high = o.seq
      return true
    }
    const behind = st.high - o.seq
    if (behind >= WINDOW) return false
    const bit = 1n << BigInt(behind)
    if ((st.mask & bit) !== 0n) return false
    st.mask |= bit
    return true
  }

  get size (): number { return this.signers.size }
}

/**
 * This process's epoch: the wall clock in ms, but always above the epoch of the previous run on this
 * data dir (kept in <dataDir>/mesh-epoch), so that a clock stepped back cannot make peers take our
 * new messages for replays.
 */
export async function nextEpoch (dataDir: string, now = Date.now()): Promise<number> {
  const file = join(dataDir, 'mesh-epoch')
  let prev = 0
  try {
    const n = Number((await readFile(file, 'utf8')).trim())
    if (Number.isSafeInteger(n) && n > 0) prev = n
  } catch { /* first run */ }
  const epoch = Math.max(now, prev + 1)
  await writeFile(`${file}.tmp`, String(epoch), { mode: 0o600 })
  await rename(`${file}.tmp`, file)
  return epoch
}

// ---- gossipsub scoring ---------------------------------------------------------------------

export const SCORE_THRESHOLDS = { gossipThreshold: -100, publishThreshold: -200, graylistThreshold: -400, acceptPXThreshold: 100, opportunisticGraftThreshold: 5 }

/**
 * gossipsub's own peer scoring for the announce topic. Invalid messages (what the validator rejects:
 * malformed, unsigned, over its own rate limit) cost the sender counter² points, decaying by 10% a
 * second; about 20 in a row take a peer below the graylist threshold, after which gossipsub drops its
 * RPCs before they are even parsed. Announcements are sporadic, so silence in the mesh is not
 * penalised (P3 off). The application score is our data-path score (PeerIndex, -20..5) × 5.
 */
export function gossipScoring (appScore: (peerId: string) => number): Pick<GossipsubOpts, 'scoreParams' | 'scoreThresholds'> {
  return {
    scoreParams: {
      topics: {
        [ANNOUNCE_TOPIC]: {
          topicWeight: 1,
          timeInMeshWeight: 0.01,
          timeInMeshQuantum: 1_000,
          timeInMeshCap: 300,
          firstMessageDeliveriesWeight: 0.5,
          firstMessageDeliveriesDecay: 0.9,
          firstMessageDeliveriesCap: 10,
          meshMessageDeliveriesWeight: 0,
          meshMessageDeliveriesDecay: 0.5,
          meshMessageDeliveriesCap: 100,
          meshMessageDeliveriesThreshold: 1,
          meshMessageDeliveriesWindow: 10,
          meshMessageDeliveriesActivation: 5_000,
          meshFailurePenaltyWeight: 0,
          meshFailurePenaltyDecay: 0.5,
          invalidMessageDeliveriesWeight: -1,
          invalidMessageDeliveriesDecay: 0.9,
        },
      },
      topicScoreCap: 10,
      appSpecificScore: appScore,
      appSpecificWeight: 5,
      IPColocationFactorWeight: -5,
      IPColocationFactorThreshold: 10,
      behaviourPenaltyWeight: -10,
      behaviourPenaltyThreshold: 0,
      behaviourPenaltyDecay: 0.9,
      decayInterval: 1_000,
      decayToZero: 0.01,
      retainScore: 10 * 60_000,
    },
    scoreThresholds: SCORE_THRESHOLDS,
  }
}

// ---- the component -------------------------------------------------------------------------

export interface AnnounceCounters {
  gossipSentMessages: number
  /** Payload bytes of gossip messages we published (before gossipsub framing and signatures). */
  gossipSentBytes: number
  /** Time our publishing waited to stay under the rate limit peers apply (ms). */
  gossipSendThrottledMs: number
  gossipReceived: number
  gossipDropped: Record<string, number>
}

interface AnnounceNode {
  peerId: PeerId
  getConnections: (peerId?: PeerId) => unknown[]
  services: { pubsub: { publish: (topic: string, data?: Uint8Array) => Promise<unknown>, getSubscribers: (topic: string) => PeerId[] } }
}

export interface AnnounceComponents {
  logger: Logger
  index: PeerIndex
  /** The running libp2p node, or undefined while stopped. */
  node: () => AnnounceNode | undefined
  /** A peer withdrew everything (remove all). */
  onWithdraw: (peerId: string) => void
  /** A member we hold no connection to announced where it listens (peer exchange). */
  onPeerAddrs?: (peerId: PeerId, addrs: string[]) => void
}

export interface AnnounceInit {
  dataPort: number
  /** Ids of the upstreams this node fetches for the mesh, announced in hello. */
  upstreams?: string[]
  /** Our listen multiaddrs, announced in hello so that peers of our peers can dial us. */
  addrs?: () => string[]
  /** This process's epoch (nextEpoch). */
  epoch: number
  limits?: Partial<GossipLimits>
}

export interface Announcer {
  /** Queues a change of our public holdings; changes are batched (100 ms) and published in order. */
  queue: (change: HoldingsChange) => void
  /** Publishes our data port. */
  hello: () => void
  /**
   * Queues any other encoded gossip message (a JSON object from messages.ts): it is stamped with our
   * origin and published in order, under the same rate limit. At most 1,000 wait; the oldest go first.
   */
  publish: (data: Uint8Array) => void
  /** Stops publishing what is queued, then publishes `remove all` (best effort). */
  withdraw: () => Promise<void>
  /** The gossipsub topic validator. */
  validate: (from: PeerId, msg: Message) => TopicValidatorResult
  /** The gossipsub message listener: applies validated announcements of connected peers to the index. */
  onMessage: (evt: CustomEvent<Message>) => void
  counters: () => AnnounceCounters
  /** Starts publishing (what was queued while stopped goes out now). */
  start: () => void
  stop: () => Promise<void>
}

export function createAnnouncer (components: AnnounceComponents, init: AnnounceInit): Announcer {
  const log = components.logger
  const { index } = components
  const limits: GossipLimits = { ...DEFAULT_GOSSIP_LIMITS, ...init.limits }
  const counters: AnnounceCounters = { gossipSentMessages: 0, gossipSentBytes: 0, gossipSendThrottledMs: 0, gossipReceived: 0, gossipDropped: {} }
  const bySigner = new RateLimiter(limits)
  const byForwarder = new RateLimiter(limits, limits.forwarderFactor)
  const replay = new ReplayGuard()
  /** Decoded messages, handed from the validator to the listener; `checked`: passed the replay check. */
  const validated = new WeakMap<Message, { message: GossipMessage, checked: boolean }>()

  let running = false
  let stopCtl = new AbortController()
  let seq = 0
  const pendingAdds = new Map<Digest, BlobEntry>()
  const pendingRemoves = new Set<Digest>()
  const pendingTags = new Map<string, TagEntry>()
  let pendingHello = false
  const pendingOther: Uint8Array[] = []
  let flushTimer: NodeJS.Timeout | undefined
  let pumping: Promise<void> | undefined
  const selfMsgs = new TokenBucket(limits.messagesPerSec * SELF_FRACTION, Math.max(1, Math.floor(limits.messagesBurst * SELF_FRACTION)), Date.now())
  const selfBytes = new TokenBucket(limits.bytesPerSec * SELF_FRACTION, Math.max(MAX_GOSSIP_BYTES, Math.floor(limits.bytesBurst * SELF_FRACTION)), Date.now())

  const drop = (reason: string): void => { counters.gossipDropped[reason] = (counters.gossipDropped[reason] ?? 0) + 1 }
  const isConnected = (peerId: PeerId): boolean => (components.node()?.getConnections(peerId).length ?? 0) > 0

  // ---- publishing ----

  async function publishNow (data: Uint8Array): Promise<void> {
    const n = components.node()
    if (n === undefined) return
    const stamped = stampOrigin(data, { epoch: init.epoch, seq: seq++ })
    counters.gossipSentMessages++
    counters.gossipSentBytes += stamped.byteLength
    try {
      await n.services.pubsub.publish(ANNOUNCE_TOPIC, stamped)
    } catch (err) {
      log.debug({ err }, 'gossip publish failed')
    }
  }

  /** Encodes everything pending, in the order peers must apply it (removes before adds, then tags). */
  function takePending (): Uint8Array[] {
    const out: Uint8Array[] = []
    if (pendingHello) { out.push(encodeHello(init.dataPort, init.upstreams ?? [], init.addrs?.() ?? [])); pendingHello = false }
    out.push(...pendingOther.splice(0))
    if (pendingRemoves.size > 0) { out.push(...encodeRemoves([...pendingRemoves])); pendingRemoves.clear() }
    if (pendingAdds.size > 0) { out.push(...encodeAdds([...pendingAdds.values()])); pendingAdds.clear() }
    for (const t of pendingTags.values()) out.push(encodeTag(t))
    pendingTags.clear()
    return out
  }

  const hasPending = (): boolean => pendingHello || pendingOther.length > 0 || pendingRemoves.size > 0 || pendingAdds.size > 0 || pendingTags.size > 0

  /**
   * Publishes what is pending, one message at a time, waiting whenever the next one would take us over
   * the rate peers accept. Changes made meanwhile wait in the pending maps, where they coalesce.
   */
  function pump (): void {
    if (pumping !== undefined || !running) return
    pumping = (async () => {
      while (running && hasPending()) {
        for (const m of takePending()) {
          const wait = Math.max(selfMsgs.waitFor(1, Date.now()), selfBytes.waitFor(m.byteLength, Date.now()))
          if (wait > 0) {
            counters.gossipSendThrottledMs += wait
            try { await sleep(wait, undefined, { signal: stopCtl.signal }) } catch { return }
          }
          if (!running) return
          selfMsgs.spend(1, Date.now())
          selfBytes.spend(m.byteLength, Date.now())
          await publishNow(m)
        }
      }
    })().finally(() => { pumping = undefined; if (running && hasPending()) pump() })
  }

  function scheduleFlush (): void {
    if (pendingAdds.size >= ADD_BATCH_MAX) { flush(); return }
    if (flushTimer === undefined) flushTimer = setTimeout(flush, ADD_BATCH_MS)
  }

  function flush (): void {
    if (flushTimer !== undefined) { clearTimeout(flushTimer); flushTimer = undefined }
    pump() // a no-op while stopped: kept pending, published at start
  }

  function queue (c: HoldingsChange): void {
    switch (c.type) {
      case 'added':
        pendingRemoves.delete(c.entry.digest)
        pendingAdds.set(c.entry.digest, c.entry)
        break
      case 'removed':
        pendingAdds.delete(c.digest)
        pendingRemoves.add(c.digest)
        break
      case 'tag':
        pendingTags.set(`${c.entry.upstream}\u0000${c.entry.repo}\u0000${c.entry.tag}`, c.entry)
        break
    }
    scheduleFlush()
  }

  // ---- receiving ----

  function validate (from: PeerId, msg: Message): TopicValidatorResult {
    if (msg.type !== 'signed') { drop('unsigned'); return TopicValidatorResult.Reject }
    // StrictSign has verified the signature with msg.key; the sender we index is that signer.
    if (!peerIdFromPublicKey(msg.key).equals(msg.from)) { drop('signer'); return TopicValidatorResult.Reject }
    const signer = msg.from.toString()
    const self = components.node()?.peerId
    // Our own message coming back (a replay, once the seen-cache has forgotten it): never forwarded again.
    if (self !== undefined && msg.from.equals(self)) { drop('self'); return TopicValidatorResult.Ignore }
    if (msg.data.byteLength > MAX_GOSSIP_BYTES) { drop('too-large'); return TopicValidatorResult.Reject }
    // Rate limits come before any parsing. Over its own limit, the signer itself is penalised (gossipsub
    // score); a forwarder passing on someone else's flood is only ignored.
    const direct = from.equals(msg.from)
    const now = Date.now()
    if (!byForwarder.allow(from.toString(), msg.data.byteLength, now)) { drop('rate-forwarder'); return direct ? TopicValidatorResult.Reject : TopicValidatorResult.Ignore }
    if (!bySigner.allow(signer, msg.data.byteLength, now)) { drop('rate-signer'); return direct ? TopicValidatorResult.Reject : TopicValidatorResult.Ignore }
    const r = decodeAnnouncement(msg.data)
    if (!r.ok) {
      drop(r.reason)
      // A newer protocol version or message type, or an older node's message without an origin, is not
      // misbehaviour: ignore it without penalising anyone (an unstamped message is still never indexed).
      return r.reason === 'version' || r.reason === 'unknown-type' || r.reason === 'origin' ? TopicValidatorResult.Ignore : TopicValidatorResult.Reject
    }
    // Replays are checked for the signers we are connected to: the only ones we index. (For others we
    // keep no state, which a stream of made-up signers could otherwise evict.)
    const checked = isConnected(msg.from)
    if (checked && !replay.accept(signer, r.value.origin)) { drop('replay'); return TopicValidatorResult.Ignore }
    validated.set(msg, { message: r.value.message, checked })
    return TopicValidatorResult.Accept
  }

  function onMessage (evt: CustomEvent<Message>): void {
    const msg = evt.detail
    if (msg.topic !== ANNOUNCE_TOPIC || msg.type !== 'signed') return
    const self = components.node()?.peerId
    if (self === undefined || msg.from.equals(self)) return
    const from = msg.from.toString()
    // Only peers we hold a connection to are indexed: a relayed signer we cannot reach is of no use, and
    // any keypair can sign, so indexing strangers would let one node fill every index with made-up peers.
    const v = validated.get(msg)
    if (v !== undefined && !isConnected(msg.from) && v.message.t === 'hello' && v.message.addrs !== undefined) {
      // Peer exchange: a member we are not connected to says where it listens (the message is signed by
      // it). Its replays are not tracked (no state for strangers); a replayed hello costs at most one
      // dial a minute to an address that peer once announced.
      components.onPeerAddrs?.(msg.from, v.message.addrs)
    }
    if (v === undefined || !v.checked || !isConnected(msg.from)) { drop('not-connected'); return }
    const m = v.message
    counters.gossipReceived++
    const now = Date.now()
    index.touch(from, now)
    switch (m.t) {
      case 'add': index.addBlobs(from, m.blobs, now); break
      case 'remove':
        if (m.all) { index.removeAll(from, now); components.onWithdraw(from) } else index.removeBlobs(from, m.digests, now)
        break
      case 'tag': index.putTag(from, m.entry, now); break
      case 'hello':
        index.setDataPort(from, m.dataPort, now)
        if (m.upstreams !== undefined) index.setUpstreams(from, m.upstreams, now)
        break
      case 'filling': index.putFilling(from, m.digest, m.size, m.ttlMs, now); break
      case 'unfilling': index.dropFilling(from, m.digest); break
    }
  }

  return {
    queue,
    hello () { pendingHello = true; flush() },
    publish (data) {
      if (pendingOther.length >= 1_000) { pendingOther.shift(); drop('send-queue-full') }
      pendingOther.push(data)
      flush()
    },
    async withdraw () {
      running = false
      stopCtl.abort()
      if (pumping !== undefined) await pumping
      // Just after connecting, gossipsub may not know yet who subscribes: give it a moment (bounded),
      // or the withdrawal goes to no one and peers keep our holdings until their TTL.
      for (let i = 0; i < 50 && (components.node()?.services.pubsub.getSubscribers(ANNOUNCE_TOPIC).length ?? 1) === 0; i++) await sleep(10)
      await publishNow(encodeRemoveAll())
    },
    validate,
    onMessage,
    counters: () => ({ ...counters, gossipDropped: { ...counters.gossipDropped } }),
    start () {
      if (running) return
      stopCtl = new AbortController()
      running = true
      flush()
    },
    async stop () {
      running = false
      stopCtl.abort()
      if (flushTimer !== undefined) { clearTimeout(flushTimer); flushTimer = undefined }
      if (pumping !== undefined) await pumping
    },
  }
}
