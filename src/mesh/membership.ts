// Mesh membership: who we know, who we dial, and when we dial them again.
//
// It owns discovery (mDNS, bootstrap addresses), dialing, redial with exponential backoff and jitter
// after a disconnect, the connection tag that keeps mesh connections through libp2p's pruning, and the
// closing of duplicate connections. Gossip and inventory never dial: they only see peers connect.
//
// Why redial here: libp2p 3 fires `peer:discovery` only for a peer new to its peer store, so a peer
// seen once is never "discovered" again after a partition, a link blip or a restart. This module hears
// every mDNS response itself (it runs the mDNS service rather than handing it to libp2p) and keeps its
// own table of peers to redial. libp2p's KEEP_ALIVE reconnect queue is not used: it gives up after five
// attempts and then drops the tag, so a 20 s partition would be enough to lose a peer for good.
import { setMaxListeners } from 'node:events'
import { mdns } from '@libp2p/mdns'
import { peerIdFromString } from '@libp2p/peer-id'
import { multiaddr, type Multiaddr } from '@multiformats/multiaddr'
import type { Connection, Libp2p, PeerId, PeerInfo } from '@libp2p/interface'
import type { Logger } from '../logger.js'

/** Peer-store tag on every mesh peer we connect to: weighs against pruning when libp2p is over its connection limit. */
export const MESH_TAG = 'pullmesh-mesh'
const MESH_TAG_VALUE = 100

// ------------------------------------------------------------------ pure schedule logic

export interface BackoffPolicy {
  /** Delay before the first redial after a disconnect (attempt 0). */
  firstMs: number
  /** Growth per failed attempt. */
  factor: number
  /** Cap of the delay before jitter. */
  maxMs: number
  /** Spread in [0, 1]: the delay is uniform in [base·(1−jitter), base·(1+jitter)]. */
  jitter: number
}

export const DEFAULT_BACKOFF: BackoffPolicy = { firstMs: 250, factor: 2, maxMs: 20_000, jitter: 0.25 }

/** The delay before redial attempt `attempt` (0-based): firstMs·factor^attempt, capped at maxMs, then jittered. */
export function backoffDelay (attempt: number, p: BackoffPolicy, random: () => number = Math.random): number {
  const n = Number.isFinite(attempt) && attempt > 0 ? Math.floor(attempt) : 0
  const base = Math.min(p.maxMs, p.firstMs * p.factor ** n)
  const j = Math.min(1, Math.max(0, p.jitter))
  const r = Math.min(1, Math.max(0, random()))
  return Math.max(0, Math.round(base * (1 - j + 2 * j * r)))
}

export interface RedialTableInit {
  /** Our own peer id: of two peers, the smaller id dials first when both see each other at once. */
  self: string
  policy?: BackoffPolicy
  /** At most this many peers are tracked; the least recently seen unconnected, unpinned one makes room. */
  maxPeers?: number
  /** An unconnected, unpinned peer not seen (no sighting, no connection) for this long is forgotten. */
  forgetAfterMs?: number
  /** The peer with the larger id waits this long after a sighting (or a disconnect) before dialing. */
  tieDelayMs?: number
  /** A sighting brings a pending redial forward, but never closer than this to the previous attempt. */
  sightingGapMs?: number
  /**
   * Sightings shortcut the backoff only for the first this-many failed attempts: a peer that answers
   * mDNS but cannot be reached (another mesh key, a firewall) then costs one dial per backoff period.
   */
  maxSightingShortcuts?: number
  random?: () => number
}

export interface RedialEntry {
  id: string
  /** Bootstrap peers are never forgotten or evicted. */
  pinned: boolean
  connected: boolean
  /** Connected at least once: a dial counts as a redial. */
  wasConnected: boolean
  dialing: boolean
  /** Failed attempts since the last connection. */
  attempts: number
  /** When the next dial is due; undefined while connected, dialing, or not scheduled. */
  nextAt: number | undefined
  lastAttemptAt: number
  lastSeenAt: number
}

/**
 * Which peers to dial and when. Pure: time comes in as arguments, randomness from `random`.
 * The caller reports sightings, connects, disconnects, and the start and failure of each dial.
 */
export class RedialTable {
  private readonly peers = new Map<string, RedialEntry>()
  private readonly policy: BackoffPolicy
  private readonly maxPeers: number
  private readonly forgetAfterMs: number
  private readonly tieDelayMs: number
  private readonly sightingGapMs: number
  private readonly maxSightingShortcuts: number
  private readonly random: () => number

  constructor (private readonly init: RedialTableInit) {
    this.policy = init.policy ?? DEFAULT_BACKOFF
    this.maxPeers = init.maxPeers ?? 256
    this.forgetAfterMs = init.forgetAfterMs ?? 60 * 60_000
    this.tieDelayMs = init.tieDelayMs ?? 300
    this.sightingGapMs = init.sightingGapMs ?? 2_000
    this.maxSightingShortcuts = init.maxSightingShortcuts ?? 8
    this.random = init.random ?? Math.random
  }

  get size (): number { return this.peers.size }
  get (id: string): Readonly<RedialEntry> | undefined { return this.peers.get(id) }
  ids (): string[] { return [...this.peers.keys()] }

  private tie (id: string): number { return this.init.self < id ? 0 : this.tieDelayMs }

  private entry (id: string, now: number, pinned: boolean): RedialEntry | undefined {
    let e = this.peers.get(id)
    if (e !== undefined) { if (pinned) e.pinned = true; return e }
    if (id === this.init.self) return undefined
    if (this.peers.size >= this.maxPeers && !this.evict()) return undefined
    e = { id, pinned, connected: false, wasConnected: false, dialing: false, attempts: 0, nextAt: undefined, lastAttemptAt: -Infinity, lastSeenAt: now }
    this.peers.set(id, e)
    return e
  }

  /** Makes room by dropping the least recently seen peer that is neither connected, dialing nor pinned. */
  private evict (): boolean {
    let victim: RedialEntry | undefined
    for (const e of this.peers.values()) {
      if (e.connected || e.dialing || e.pinned) continue
      if (victim === undefined || e.lastSeenAt < victim.lastSeenAt) victim = e
    }
    if (victim === undefined) return false
    this.peers.delete(victim.id)
    return true
  }

  /**
   * Discovery saw the peer (an mDNS response, a bootstrap entry): it is probably reachable now. An
   * unconnected peer is dialed at once (after the tie delay if our id is the larger), or, if a dial
   * was tried recently, `sightingGapMs` after that attempt: a sighting shortcuts a long backoff
   * (for the first `maxSightingShortcuts` failed attempts).
   */
  seen (id: string, now: number, o: { pinned?: boolean } = {}): void {
    const e = this.entry(id, now, o.pinned === true)
    if (e === undefined) return
    e.lastSeenAt = now
    if (e.connected || e.dialing) return
    if (e.nextAt !== undefined && e.attempts >= this.maxSightingShortcuts) return
    const at = Math.max(now + this.tie(id), e.lastAttemptAt + this.sightingGapMs)
    if (e.nextAt === undefined || at < e.nextAt) e.nextAt = at
  }

  /**
   * Someone on the LAN just asked who is there (an mDNS query for our service): often a node that has
   * (re)started. Pending redials of peers we were connected to are brought forward to now (after the
   * tie delay), at most `nudgeGapMs` after their previous attempt, within the shortcut budget.
   */
  nudged (now: number, nudgeGapMs = 250): void {
    for (const e of this.peers.values()) {
      if (e.connected || e.dialing || !e.wasConnected || e.nextAt === undefined || e.attempts >= this.maxSightingShortcuts) continue
      const at = Math.max(now + this.tie(e.id), e.lastAttemptAt + nudgeGapMs)
      if (at < e.nextAt) e.nextAt = at
    }
  }

  connected (id: string, now: number): void {
    const e = this.entry(id, now, false)
    if (e === undefined) return
    e.connected = true
    e.wasConnected = true
    e.attempts = 0
    e.nextAt = undefined
    e.lastSeenAt = now
  }

  /** The last connection to the peer closed: redial soon (the first delay is short, so a restarted peer is back fast). */
  disconnected (id: string, now: number): void {
    const e = this.peers.get(id)
    if (e === undefined) return
    e.connected = false
    e.attempts = 0
    e.lastSeenAt = now
    if (!e.dialing) e.nextAt = now + backoffDelay(0, this.policy, this.random) + this.tie(id)
  }

  /** Up to `max` peers whose dial is due, earliest first; each is marked as dialing. */
  due (now: number, max: number): string[] {
    if (max <= 0) return []
    const ready = [...this.peers.values()]
      .filter(e => !e.connected && !e.dialing && e.nextAt !== undefined && e.nextAt <= now)
      .sort((a, b) => (a.nextAt ?? 0) - (b.nextAt ?? 0))
      .slice(0, max)
    for (const e of ready) { e.dialing = true; e.nextAt = undefined; e.lastAttemptAt = now }
    return ready.map(e => e.id)
  }

  /** A dial ended. On failure (and still unconnected), the next attempt is scheduled with backoff. */
  dialEnded (id: string, now: number, ok: boolean): void {
    const e = this.peers.get(id)
    if (e === undefined) return
    e.dialing = false
    if (ok || e.connected) return
    e.nextAt = now + backoffDelay(++e.attempts, this.policy, this.random)
  }

  /** Forgets unconnected, unpinned peers not seen for `forgetAfterMs`; returns their ids. */
  expire (now: number): string[] {
    const gone: string[] = []
    for (const e of this.peers.values()) {
      if (e.connected || e.dialing || e.pinned) continue
      if (now - e.lastSeenAt >= this.forgetAfterMs) gone.push(e.id)
    }
    for (const id of gone) this.peers.delete(id)
    return gone
  }

  /** The earliest due time, if any dial is scheduled. */
  nextDue (): number | undefined {
    let t: number | undefined
    for (const e of this.peers.values()) if (!e.connected && !e.dialing && e.nextAt !== undefined && (t === undefined || e.nextAt < t)) t = e.nextAt
    return t
  }
}

// ------------------------------------------------------------------ the component

/** The parts of a libp2p node that membership uses. */
export type MembershipNode = Pick<Libp2p, 'peerId' | 'logger' | 'getConnections' | 'getMultiaddrs' | 'dial' | 'peerStore' | 'addEventListener' | 'removeEventListener'>

export interface MembershipComponents { logger: Logger, node: MembershipNode }

/** The redial table's tuning (see RedialTableInit), plus discovery and dialing. */
export interface MembershipInit extends Omit<RedialTableInit, 'self' | 'random'> {
  /** Multiaddrs ending in /p2p/<id>: dialed at start, and redialed with backoff whenever disconnected. */
  bootstrap: string[]
  mdns: boolean
  /** mDNS service tag and query interval (default 60 s, after queries at start, +1 s and +5 s: see MDNS_STARTUP_QUERIES_MS). */
  mdnsServiceTag?: string
  mdnsIntervalMs?: number
  /** Dials in flight at once (default 4). */
  maxParallelDials?: number
  /** Per dial (default 10 s). */
  dialTimeoutMs?: number
  /** How often due dials are started (default 100 ms). */
  tickMs?: number
}

export interface MembershipCounters {
  sightings: number
  /** mDNS queries for our service heard (each nudges pending redials). */
  queriesHeard: number
  dials: number
  dialFailures: number
  /** Dials of a peer we were connected to before (after a disconnect). */
  redials: number
  forgotten: number
  duplicateConnectionsClosed: number
}

export interface Membership {
  /** Idempotent. Call after the libp2p node has started (mDNS answers with its listen addresses). */
  start (): Promise<void>
  /** Idempotent. Call before the libp2p node stops. */
  stop (): Promise<void>
  counters (): MembershipCounters
  /** The peers tracked for redial (diagnostics). */
  tracked (): Array<Readonly<RedialEntry>>
  /** How many tracked peers are not connected now. */
  unconnected (): number
}

const DEDUPE_RETRY_MS = [2_000, 10_000]
/**
 * mDNS cost: every query is answered by every node (the asker too), so a LAN of N nodes querying every
 * T carries N(N+1)/T packets (N = 100: 60,600/min at T = 10 s, 10,100/min at the default T = 60 s). A new node's
 * first query (sent at once) already reaches the whole LAN; these extra ones, early, cover a lost
 * packet or a link that was not forwarding yet. Known peers are kept by redial, not by mDNS.
 */
const MDNS_STARTUP_QUERIES_MS = [1_000, 5_000]
const MDNS_DEFAULT_INTERVAL_MS = 60_000
const FORGET_SWEEP_MS = 60_000

type QueryListener = (packet: { questions?: Array<{ name?: string }> }) => void
interface QuerySocket {
  on: (e: 'query', f: QueryListener) => unknown
  removeListener: (e: 'query', f: QueryListener) => unknown
  query: (q: { questions: Array<{ name: string, type: 'PTR' }> }) => unknown
}

/** A bootstrap multiaddr split into the peer id and the address without it: `/ip4/…/tcp/…/p2p/ID` → ID, `/ip4/…/tcp/…`. */
function splitPeerAddr (addr: string): { id: string, ma: Multiaddr } | undefined {
  const full = multiaddr(addr)
  const id = full.getComponents().findLast(c => c.name === 'p2p')?.value
  if (id === undefined) return undefined
  return { id, ma: multiaddr(addr.replace(/\/p2p\/[^/]+$/, '')) }
}

export function createMembership (components: MembershipComponents, init: MembershipInit): Membership {
  const log = components.logger.child({ component: 'membership' })
  const { node } = components
  const selfId = node.peerId.toString()
  const table = new RedialTable({
    self: selfId,
    ...(init.policy !== undefined ? { policy: init.policy } : {}),
    ...(init.maxPeers !== undefined ? { maxPeers: init.maxPeers } : {}),
    ...(init.forgetAfterMs !== undefined ? { forgetAfterMs: init.forgetAfterMs } : {}),
    ...(init.tieDelayMs !== undefined ? { tieDelayMs: init.tieDelayMs } : {}),
    ...(init.sightingGapMs !== undefined ? { sightingGapMs: init.sightingGapMs } : {}),
    ...(init.maxSightingShortcuts !== undefined ? { maxSightingShortcuts: init.maxSightingShortcuts } : {}),
  })
  const maxParallel = init.maxParallelDials ?? 4
  const dialTimeoutMs = init.dialTimeoutMs ?? 10_000
  const counters: MembershipCounters = { sightings: 0, queriesHeard: 0, dials: 0, dialFailures: 0, redials: 0, forgotten: 0, duplicateConnectionsClosed: 0 }
  const bootstrap = new Map<string, Multiaddr[]>()
  for (const addr of init.bootstrap) {
    try {
      const p = splitPeerAddr(addr)
      if (p === undefined) { log.warn({ addr }, 'bootstrap address has no /p2p/ peer id: ignored'); continue }
      if (p.id === selfId) continue
      bootstrap.set(p.id, [...(bootstrap.get(p.id) ?? []), p.ma])
    } catch (err) {
      log.warn({ err, addr }, 'bad bootstrap address')
    }
  }

  let started = false
  let stopCtl = new AbortController()
  let inflight = 0
  const dials = new Set<Promise<void>>()
  let tickTimer: NodeJS.Timeout | undefined
  let mdnsSocket: QuerySocket | undefined
  let sweepTimer: NodeJS.Timeout | undefined
  let startupQueryTimers: NodeJS.Timeout[] = []
  const serviceTag = init.mdnsServiceTag ?? 'pullmesh.local'
  let discovery: { start: () => Promise<void> | void, stop: () => Promise<void> | void, addEventListener: (t: 'peer', f: (e: CustomEvent<PeerInfo>) => void) => void, removeEventListener: (t: 'peer', f: (e: CustomEvent<PeerInfo>) => void) => void } | undefined

  function tag (peerId: PeerId, on: boolean): void {
    node.peerStore.merge(peerId, { tags: { [MESH_TAG]: on ? { value: MESH_TAG_VALUE } : undefined } })
      .catch((err: unknown) => log.debug({ err, peer: peerId.toString() }, 'peer tag update failed'))
  }

  function tick (): void {
    if (!started) return
    const ids = table.due(Date.now(), maxParallel - inflight)
    for (const id of ids) startDial(id)
  }

  function startDial (id: string): void {
    inflight++
    counters.dials++
    if (table.get(id)?.wasConnected === true) counters.redials++
    const peerId = peerIdFromString(id)
    const p = (async () => {
      let ok = false
      try {
        if (node.getConnections(peerId).length > 0) { ok = true; return }
        const addrs = bootstrap.get(id)
        // Bootstrap addresses go back into the peer store before each dial: libp2p drops addresses it has not seen for an hour.
        if (addrs !== undefined) await node.peerStore.merge(peerId, { multiaddrs: addrs })
        await node.dial(peerId, { signal: AbortSignal.any([stopCtl.signal, AbortSignal.timeout(dialTimeoutMs)]) })
        ok = true
      } catch (err) {
        counters.dialFailures++
        if (started) log.debug({ err, peer: id, attempt: (table.get(id)?.attempts ?? 0) + 1 }, 'dial failed')
      } finally {
        inflight--
        table.dialEnded(id, Date.now(), ok)
      }
    })()
    dials.add(p)
    void p.finally(() => dials.delete(p))
  }

  function sighted (id: string, pinned: boolean): void {
    if (!started || id === selfId) return
    counters.sightings++
    table.seen(id, Date.now(), { pinned })
  }

  function onDiscoveryPeer (evt: CustomEvent<PeerInfo>): void {
    const peer = evt.detail
    const id = peer.id.toString()
    if (id === selfId) return
    // We run mDNS ourselves, so the addresses go into the peer store here (libp2p does that only for its own discovery services).
    node.peerStore.merge(peer.id, { multiaddrs: peer.multiaddrs })
      .then(() => { sighted(id, false) }, (err: unknown) => log.debug({ err, peer: id }, 'could not store discovered addresses'))
  }

  /** An mDNS query for our service: a node may just have come (back) up, so redial recently lost peers now. */
  function onMdnsQuery (packet: { questions?: Array<{ name?: string }> }): void {
    if (!started || packet.questions?.some(q => q.name === serviceTag) !== true) return
    counters.queriesHeard++
    table.nudged(Date.now())
  }

  /** `peer:discovery` from libp2p (other discovery paths, e.g. identify): the peer is new to the peer store. */
  function onLibp2pDiscovery (evt: CustomEvent<PeerInfo>): void {
    sighted(evt.detail.id.toString(), false)
  }

  function onPeerConnect (evt: CustomEvent<PeerId>): void {
    const id = evt.detail.toString()
    table.connected(id, Date.now())
    tag(evt.detail, true)
  }

  function onPeerDisconnect (evt: CustomEvent<PeerId>): void {
    if (!started) return
    table.disconnected(evt.detail.toString(), Date.now())
  }

  function onConnectionOpen (evt: CustomEvent<Connection>): void {
    const conn = evt.detail
    if (node.getConnections(conn.remotePeer).length > 1) {
      const t = setTimeout(() => { dedupeConnections(conn.remotePeer) }, 250)
      t.unref()
    }
  }

  /**
   * Two nodes that dial each other at once can end up with two connections. Both sides prefer the same
   * one (dialed by the peer with the smaller id, oldest first) and close the others, but only once a
   * duplicate carries no open stream: gossipsub keeps one long-lived stream per peer and direction and
   * does not re-open it elsewhere, so closing a connection that carries it would silence gossip.
   * A duplicate that keeps carrying streams is left alone (it costs a socket, nothing more).
   */
  function dedupeConnections (peerId: PeerId, attempt = 0): void {
    if (!started) return
    const conns = node.getConnections(peerId).filter(c => c.status === 'open')
    if (conns.length < 2) return
    const preferred = selfId < peerId.toString() ? 'outbound' : 'inbound'
    const sorted = [...conns].sort((a, b) => (Number(b.direction === preferred) - Number(a.direction === preferred)) || (a.timeline.open - b.timeline.open))
    let busy = false
    for (const c of sorted.slice(1)) {
      if (c.streams.some(s => s.status === 'open')) { busy = true; continue }
      log.debug({ peer: peerId.toString(), direction: c.direction }, 'closing duplicate connection')
      counters.duplicateConnectionsClosed++
      c.close().catch(() => { c.abort(new Error('duplicate connection')) })
    }
    if (busy && attempt < DEDUPE_RETRY_MS.length) {
      const t = setTimeout(() => { dedupeConnections(peerId, attempt + 1) }, DEDUPE_RETRY_MS[attempt])
      t.unref()
    }
  }

  function sweep (): void {
    const gone = table.expire(Date.now())
    counters.forgotten += gone.length
    for (const id of gone) tag(peerIdFromString(id), false)
  }

  return {
    async start () {
      if (started) return
      started = true
      stopCtl = new AbortController()
      // Every dial of this component listens on it: dozens at once in a large mesh is expected, not a leak.
      setMaxListeners(Infinity, stopCtl.signal)
      node.addEventListener('peer:connect', onPeerConnect)
      node.addEventListener('peer:disconnect', onPeerDisconnect)
      node.addEventListener('connection:open', onConnectionOpen)
      node.addEventListener('peer:discovery', onLibp2pDiscovery)
      // Peers already connected (none, usually) count as connected.
      for (const c of node.getConnections()) {
        const id = c.remotePeer.toString()
        table.connected(id, Date.now())
        tag(c.remotePeer, true)
      }
      for (const id of bootstrap.keys()) sighted(id, true)
      tickTimer = setInterval(tick, init.tickMs ?? 100)
      tickTimer.unref()
      sweepTimer = setInterval(sweep, FORGET_SWEEP_MS)
      sweepTimer.unref()
      if (init.mdns) {
        const d = mdns({ serviceTag, interval: init.mdnsIntervalMs ?? MDNS_DEFAULT_INTERVAL_MS })({
          logger: node.logger,
          addressManager: { getAddresses: () => node.getMultiaddrs() },
        } as unknown as Parameters<ReturnType<typeof mdns>>[0])
        d.addEventListener('peer', onDiscoveryPeer)
        discovery = d as unknown as typeof discovery
        await (d as unknown as { start: () => Promise<void> }).start()
        // The service emits only responses; its multicast-dns socket (not part of its typed API) also sees queries.
        mdnsSocket = (d as unknown as { mdns?: QuerySocket }).mdns
        mdnsSocket?.on('query', onMdnsQuery)
        const socket = mdnsSocket
        startupQueryTimers = MDNS_STARTUP_QUERIES_MS.map(ms => setTimeout(() => {
          if (started && mdnsSocket === socket) socket?.query({ questions: [{ name: serviceTag, type: 'PTR' }] })
        }, ms))
        for (const t of startupQueryTimers) t.unref()
      }
      tick()
    },

    async stop () {
      if (!started) return
      started = false
      stopCtl.abort()
      if (tickTimer !== undefined) { clearInterval(tickTimer); tickTimer = undefined }
      if (sweepTimer !== undefined) { clearInterval(sweepTimer); sweepTimer = undefined }
      for (const t of startupQueryTimers) clearTimeout(t)
      startupQueryTimers = []
      node.removeEventListener('peer:connect', onPeerConnect)
      node.removeEventListener('peer:disconnect', onPeerDisconnect)
      node.removeEventListener('connection:open', onConnectionOpen)
      node.removeEventListener('peer:discovery', onLibp2pDiscovery)
      mdnsSocket?.removeListener('query', onMdnsQuery)
      mdnsSocket = undefined
      const d = discovery
      discovery = undefined
      if (d !== undefined) {
        d.removeEventListener('peer', onDiscoveryPeer)
        try { await d.stop() } catch (err) { log.debug({ err }, 'mDNS stop failed') }
      }
      await Promise.allSettled([...dials])
    },

    counters () { return { ...counters } },

    tracked () { return table.ids().map(id => table.get(id)).filter((e): e is Readonly<RedialEntry> => e !== undefined).map(e => ({ ...e })) },
    unconnected () {
      let n = 0
      for (const id of table.ids()) if (table.get(id)?.connected === false) n++
      return n
    },
  }
}
