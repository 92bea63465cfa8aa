// The local index of what peers announced: pure data, no I/O, driven by an explicit clock.
// Lookups (holders, tagRecords) read only this index, so a request never waits on the network.
import type { Digest } from '../oci/digest.js'
import type { BlobEntry, TagEntry } from './messages.js'
import type { MeshPeerStatus, PeerHolder, PeerOutcome, PeerTagRecord } from './types.js'

export interface PeerIndexInit {
  /** How long a disconnected peer (and everything it announced) is remembered. */
  peerTtlMs: number
  /** How long an announced entry lives unless refreshed by an inventory or a new announcement. */
  entryTtlMs: number
  maxBlobsPerPeer?: number
  maxTagsPerPeer?: number
  maxPeers?: number
  /**
   * Budget for everything the index holds (entries and removal marks), in accounted bytes (see
   * BLOB_COST / TAG_COST / MARK_COST). While it is full, a peer below its fair share (budget / connected
   * peers) makes room by evicting the least useful entries of others; a peer at or above its share
   * cannot push anything out. Default 128 MiB.
   */
  maxIndexBytes?: number
  /** Score decays toward 0 with this half-life. */
  scoreHalfLifeMs?: number
}

interface BlobSlot { size: number, mediaType: string, expires: number, refreshedAt: number }
interface TagSlot { entry: TagEntry, expires: number, refreshedAt: number }
interface FillingSlot { size: number, expires: number }

/** Filling records a peer may have at once (each is a fill in progress on that peer). */
const MAX_FILLING_PER_PEER = 256
/** A peer whose score fell below this (two bad transfers in a row) is not offered as a holder until it recovers. */
export const QUARANTINE_SCORE = -7.5

interface PeerState {
  peerId: string
  blobs: Map<Digest, BlobSlot>
  tags: Map<string, TagSlot>
  /** digest → when a remove arrived; lets an inventory that was in flight not resurrect it. */
  removedAt: Map<Digest, number>
  /** Fills in progress on the peer that may be streamed from (digest → size), short-lived. */
  filling: Map<Digest, FillingSlot>
  /** Upstream ids the peer fetches for the mesh (from its hello / inventory). */
  upstreams: string[]
  /** Time of the last `remove all` (withdrawal). */
  withdrawnAt: number
  dataPort?: number
  /** IP of our libp2p connection to the peer (kept after disconnect for the grace period). */
  host?: string
  addrs: string[]
  connected: boolean
  disconnectedAt: number
  lastSeen: number
  score: number
  scoreAt: number
  bytes: number
  /** Accounted memory of this peer's entries and removal marks (counted in PeerIndex.used). */
  cost: number
}

/**
 * Accounted bytes per entry. Measured on Node 20 (heap after gc, entries parsed from JSON as gossip
 * delivers them): a blob entry takes 170–230 bytes, a tag entry about 940 (its reverse-index set is
 * most of it). The constants plus the strings' lengths stay at or above that: a blob is accounted at
 * about 430 bytes, a tag at about 1,000.
 */
export const BLOB_COST = 320
export const TAG_COST = 800
export const MARK_COST = 160
const blobCost = (d: string, mediaType: string): number => BLOB_COST + d.length + mediaType.length
const tagCost = (e: TagEntry): number => TAG_COST + e.upstream.length + e.repo.length + e.tag.length + e.record.digest.length + e.record.mediaType.length

const tagKey = (upstream: string, repo: string, tag: string): string => `${upstream}\u0000${repo}\u0000${tag}`

export function formatDataUrl (host: string, port: number): string {
  return host.includes(':') ? `http://[${host}]:${port}` : `http://${host}:${port}`
}

/** How far ahead of our clock a peer's timestamps may be. */
export const MAX_CLOCK_SKEW_MS = 60_000

export class PeerIndex {
  private readonly peers = new Map<string, PeerState>()
  private readonly byDigest = new Map<Digest, Set<string>>()
  private readonly byTag = new Map<string, Set<string>>()
  private readonly maxBlobs: number
  private readonly maxTags: number
  private readonly maxPeers: number
  private readonly maxBytes: number
  private readonly halfLife: number
  /** Accounted bytes of all entries and marks. */
  private used = 0
  private connectedCount = 0
  /** Entries refused or evicted because the budget was full (for diagnostics). */
  readonly evictions = { refused: 0, evicted: 0, peersEvicted: 0 }

  constructor (private readonly init: PeerIndexInit) {
    this.maxBlobs = init.maxBlobsPerPeer ?? 100_000
    this.maxTags = init.maxTagsPerPeer ?? 10_000
    this.maxPeers = init.maxPeers ?? 1024
    this.maxBytes = init.maxIndexBytes ?? 128 * 1024 * 1024
    this.halfLife = init.scoreHalfLifeMs ?? 10 * 60_000
  }

  private peer (peerId: string, now: number, create = true): PeerState | undefined {
    let p = this.peers.get(peerId)
    if (p === undefined && create) {
      // All slots taken: the least useful peer (disconnected, then lowest score, then least recently
      // seen) makes room; a newcomer is never silently ignored.
      if (this.peers.size >= this.maxPeers) {
        const victim = this.leastUsefulPeer(now)
        if (victim === undefined) return undefined
        this.forget(victim.peerId)
        this.evictions.peersEvicted++
      }
      p = { peerId, blobs: new Map(), tags: new Map(), removedAt: new Map(), filling: new Map(), upstreams: [], withdrawnAt: 0, addrs: [], connected: false, disconnectedAt: now, lastSeen: now, score: 0, scoreAt: now, bytes: 0, cost: 0 }
      this.peers.set(peerId, p)
    }
    if (p !== undefined) p.lastSeen = Math.max(p.lastSeen, now)
    return p
  }

  private leastUsefulPeer (now: number): PeerState | undefined {
    let best: PeerState | undefined
    let bestKey: [number, number, number] | undefined
    for (const p of this.peers.values()) {
      const key: [number, number, number] = [p.connected ? 1 : 0, this.scoreOf(p, now), p.connected ? p.lastSeen : p.disconnectedAt]
      if (bestKey === undefined || key[0] < bestKey[0] || (key[0] === bestKey[0] && (key[1] < bestKey[1] || (key[1] === bestKey[1] && key[2] < bestKey[2])))) {
        best = p; bestKey = key
      }
    }
    return best
  }

  // ---- memory budget ----

  /** A connected peer's fair share of the budget. */
  fairShare (): number {
    return Math.floor(this.maxBytes / Math.max(1, this.connectedCount))
  }

  /** Makes room for `cost` more bytes for peer p; false if p may not have them. */
  private reserve (p: PeerState, cost: number, now: number): boolean {
    if (this.used + cost <= this.maxBytes) return true
    const fair = this.fairShare()
    // At or above its share, a peer cannot push others out (it may still use free space, above).
    if (p.cost + cost > fair) { this.evictions.refused++; return false }
    while (this.used + cost > this.maxBytes) {
      const victim = this.victim(p, fair, now)
      if (victim === undefined) { this.evictions.refused++; return false }
      // Oldest entries first (Map order is insertion order): blobs, then marks, then tags.
      const before = victim.cost
      while (this.used + cost > this.maxBytes && (!victim.connected || victim.cost > fair)) {
        const d = victim.blobs.keys().next()
        if (d.done !== true) { this.dropBlob(victim, d.value); this.evictions.evicted++; continue }
        const m = victim.removedAt.keys().next()
        if (m.done !== true) { this.dropMark(victim, m.value); continue }
        const t = victim.tags.keys().next()
        if (t.done !== true) { this.dropTag(victim, t.value); this.evictions.evicted++; continue }
        break
      }
      if (victim.cost === before) { this.evictions.refused++; return false }
    }
    return true
  }

  /** Whose entries go first: disconnected peers (longest gone first), then connected peers above their share (lowest score, then largest). */
  private victim (self: PeerState, fair: number, now: number): PeerState | undefined {
    let best: PeerState | undefined
    let bestKey: [number, number, number] | undefined
    for (const q of this.peers.values()) {
      if (q === self || q.cost === 0) continue
      if (q.connected && q.cost <= fair) continue
      const key: [number, number, number] = [q.connected ? 1 : 0, q.connected ? this.scoreOf(q, now) : q.disconnectedAt, -q.cost]
      if (bestKey === undefined || key[0] < bestKey[0] || (key[0] === bestKey[0] && (key[1] < bestKey[1] || (key[1] === bestKey[1] && key[2] < bestKey[2])))) {
        best = q; bestKey = key
      }
    }
    return best
  }

  private setMark (p: PeerState, d: Digest, now: number): void {
    if (p.removedAt.has(d)) { p.removedAt.set(d, now); return }
    if (p.removedAt.size >= this.maxBlobs) return
    const c = MARK_COST + d.length
    if (!this.reserve(p, c, now)) return // a mark is an optimisation: skip it rather than evict for it
    p.removedAt.set(d, now)
    p.cost += c; this.used += c
  }

  private dropMark (p: PeerState, d: Digest): void {
    if (!p.removedAt.delete(d)) return
    const c = MARK_COST + d.length
    p.cost -= c; this.used -= c
  }

  /** Accounted bytes in use, and the budget. */
  memory (): { used: number, max: number, fairShare: number } {
    return { used: this.used, max: this.maxBytes, fairShare: this.fairShare() }
  }

  // ---- connection state ----

  connected (peerId: string, host: string | undefined, addrs: string[], now: number): void {
    const p = this.peer(peerId, now)
    if (p === undefined) return
    if (!p.connected) this.connectedCount++
    p.connected = true
    if (host !== undefined) p.host = host
    if (addrs.length > 0) p.addrs = addrs
  }

  disconnected (peerId: string, now: number): void {
    const p = this.peers.get(peerId)
    if (p === undefined) return
    if (p.connected) this.connectedCount--
    p.connected = false
    p.disconnectedAt = now
  }

  setDataPort (peerId: string, port: number, now: number): void {
    const p = this.peer(peerId, now)
    if (p !== undefined) p.dataPort = port
  }

  setUpstreams (peerId: string, upstreams: string[], now: number): void {
    const p = this.peer(peerId, now)
    if (p !== undefined) p.upstreams = upstreams.slice(0, 64)
  }

  // ---- announcements ----

  /** The peer is filling `digest` (size known) and can stream it; forgotten after ttlMs, or on add/unfilling. */
  putFilling (peerId: string, digest: Digest, size: number, ttlMs: number, now: number): void {
    const p = this.peer(peerId, now)
    if (p === undefined || p.blobs.has(digest)) return
    if (!p.filling.has(digest) && p.filling.size >= MAX_FILLING_PER_PEER) return
    p.filling.set(digest, { size, expires: now + ttlMs })
  }

  dropFilling (peerId: string, digest: Digest): void {
    this.peers.get(peerId)?.filling.delete(digest)
  }

  addBlobs (peerId: string, blobs: BlobEntry[], now: number): void {
    const p = this.peer(peerId, now)
    if (p === undefined) return
    for (const b of blobs) this.putBlob(p, b, now)
  }

  private putBlob (p: PeerState, b: BlobEntry, now: number): void {
    const old = p.blobs.get(b.digest)
    if (old === undefined) {
      if (p.blobs.size >= this.maxBlobs) return
      const c = blobCost(b.digest, b.mediaType)
      if (!this.reserve(p, c, now)) return
      p.cost += c; this.used += c
      let set = this.byDigest.get(b.digest)
      if (set === undefined) { set = new Set(); this.byDigest.set(b.digest, set) }
      set.add(p.peerId)
      p.blobs.set(b.digest, { size: b.size, mediaType: b.mediaType, expires: now + this.init.entryTtlMs, refreshedAt: now })
    } else {
      p.bytes -= old.size
      // same cost as before unless the media type changed (an update keeps the entry's place and cost basis)
      const delta = b.mediaType.length - old.mediaType.length
      p.cost += delta; this.used += delta
      old.size = b.size; old.mediaType = b.mediaType; old.expires = now + this.init.entryTtlMs; old.refreshedAt = now
    }
    p.filling.delete(b.digest)
    p.bytes += b.size
    this.dropMark(p, b.digest)
  }

  removeBlobs (peerId: string, digests: Digest[], now: number): void {
    const p = this.peer(peerId, now, false)
    if (p === undefined) return
    for (const d of digests) {
      // The mark stops an inventory in flight from bringing the entry back; marks count against the budget.
      this.dropBlob(p, d)
      this.setMark(p, d, now)
    }
  }

  private dropBlob (p: PeerState, d: Digest): boolean {
    const old = p.blobs.get(d)
    if (old === undefined) return false
    p.blobs.delete(d)
    p.bytes -= old.size
    const c = blobCost(d, old.mediaType)
    p.cost -= c; this.used -= c
    const set = this.byDigest.get(d)
    if (set !== undefined) { set.delete(p.peerId); if (set.size === 0) this.byDigest.delete(d) }
    return true
  }

  private dropTag (p: PeerState, key: string): void {
    const old = p.tags.get(key)
    if (old === undefined) return
    p.tags.delete(key)
    const c = tagCost(old.entry)
    p.cost -= c; this.used -= c
    const set = this.byTag.get(key)
    if (set !== undefined) { set.delete(p.peerId); if (set.size === 0) this.byTag.delete(key) }
  }

  /** The peer withdrew everything it announced (it is shutting down). */
  removeAll (peerId: string, now: number): void {
    const p = this.peers.get(peerId)
    if (p === undefined) return
    for (const d of [...p.blobs.keys()]) this.dropBlob(p, d)
    for (const k of [...p.tags.keys()]) this.dropTag(p, k)
    p.filling.clear()
    for (const d of [...p.removedAt.keys()]) this.dropMark(p, d)
    p.withdrawnAt = now
  }

  putTag (peerId: string, entry: TagEntry, now: number): void {
    const p = this.peer(peerId, now)
    if (p === undefined) return
    // A claim of verification in the future (a hostile peer, or a clock far ahead) is capped at the
    // clock skew allowed; the resolver never trusts it beyond its own "now" either.
    if (entry.record.verifiedAt > now + MAX_CLOCK_SKEW_MS) entry = { ...entry, record: { ...entry.record, verifiedAt: now + MAX_CLOCK_SKEW_MS } }
    const key = tagKey(entry.upstream, entry.repo, entry.tag)
    const old = p.tags.get(key)
    const c = tagCost(entry)
    if (old === undefined) {
      if (p.tags.size >= this.maxTags) return
      if (!this.reserve(p, c, now)) return
      let set = this.byTag.get(key)
      if (set === undefined) { set = new Set(); this.byTag.set(key, set) }
      set.add(peerId)
    } else if (old.entry.record.verifiedAt > entry.record.verifiedAt) {
      old.expires = now + this.init.entryTtlMs // an older confirmation arrived late: keep the newer one
      return
    } else {
      const oc = tagCost(old.entry)
      p.cost -= oc; this.used -= oc
    }
    p.cost += c; this.used += c
    p.tags.set(key, { entry, expires: now + this.init.entryTtlMs, refreshedAt: now })
  }

  /**
   * Replaces a peer's holdings with a complete inventory that was requested at `startedAt`.
   * Entries announced by gossip after `startedAt` survive, and digests removed after `startedAt` stay removed.
   */
  replaceInventory (peerId: string, blobs: BlobEntry[], tags: TagEntry[], startedAt: number, now: number): void {
    const p = this.peer(peerId, now)
    if (p === undefined) return
    if (p.withdrawnAt >= startedAt) return
    const keepBlobs = new Set<Digest>()
    for (const b of blobs) {
      const removed = p.removedAt.get(b.digest)
      if (removed !== undefined && removed >= startedAt) continue
      keepBlobs.add(b.digest)
      this.putBlob(p, b, now)
    }
    for (const [d, slot] of [...p.blobs]) {
      if (!keepBlobs.has(d) && slot.refreshedAt < startedAt) this.dropBlob(p, d)
    }
    const keepTags = new Set<string>()
    for (const t of tags) { keepTags.add(tagKey(t.upstream, t.repo, t.tag)); this.putTag(peerId, t, now) }
    for (const [k, slot] of [...p.tags]) {
      if (!keepTags.has(k) && slot.refreshedAt < startedAt) this.dropTag(p, k)
    }
    for (const [d, at] of [...p.removedAt]) if (at < startedAt) this.dropMark(p, d)
  }

  /**
   * Applies an inventory delta requested at `startedAt`: entries changed since the requester's last
   * exchange are put, entries gone since then are dropped, and every other entry is confirmed.
   */
  applyDelta (peerId: string, blobs: BlobEntry[], tags: TagEntry[], goneBlobs: Digest[], goneTags: Array<{ upstream: string, repo: string, tag: string }>, startedAt: number, now: number): void {
    const p = this.peer(peerId, now)
    if (p === undefined) return
    if (p.withdrawnAt >= startedAt) return
    this.refreshAll(peerId, now)
    for (const b of blobs) {
      const removed = p.removedAt.get(b.digest)
      if (removed !== undefined && removed >= startedAt) continue
      this.putBlob(p, b, now)
    }
    for (const t of tags) this.putTag(peerId, t, now)
    for (const d of goneBlobs) {
      const slot = p.blobs.get(d)
      if (slot !== undefined && slot.refreshedAt < startedAt) this.dropBlob(p, d)
    }
    for (const t of goneTags) {
      const k = tagKey(t.upstream, t.repo, t.tag)
      const slot = p.tags.get(k)
      if (slot !== undefined && slot.refreshedAt < startedAt) this.dropTag(p, k)
    }
  }

  /** The peer confirmed its holdings are unchanged since its last complete inventory: extend every entry. */
  refreshAll (peerId: string, now: number): void {
    const p = this.peers.get(peerId)
    if (p === undefined) return
    p.lastSeen = Math.max(p.lastSeen, now)
    const expires = now + this.init.entryTtlMs
    for (const slot of p.blobs.values()) slot.expires = Math.max(slot.expires, expires)
    for (const slot of p.tags.values()) slot.expires = Math.max(slot.expires, expires)
  }

  // ---- scoring ----

  private scoreOf (p: PeerState, now: number): number {
    const dt = Math.max(0, now - p.scoreAt)
    return p.score * Math.pow(0.5, dt / this.halfLife)
  }

  report (peerId: string, outcome: PeerOutcome, now: number): void {
    const p = this.peers.get(peerId)
    if (p === undefined) return
    const s = this.scoreOf(p, now)
    // 'missing': it announced the digest, then answered 404 (a mild penalty: it may just have evicted it).
    p.score = outcome === 'good' ? Math.min(5, s + 0.5) : Math.max(-20, s - (outcome === 'missing' ? 2 : 4))
    p.scoreAt = now
  }

  // ---- expiry ----

  /** Drops expired entries, and peers disconnected for longer than the peer TTL. */
  expire (now: number): void {
    for (const p of [...this.peers.values()]) {
      if (!p.connected && now - p.disconnectedAt > this.init.peerTtlMs && now - p.lastSeen > this.init.peerTtlMs) {
        this.forget(p.peerId)
        continue
      }
      for (const [d, slot] of [...p.blobs]) if (slot.expires <= now) this.dropBlob(p, d)
      for (const [k, slot] of [...p.tags]) if (slot.expires <= now) this.dropTag(p, k)
      for (const [d, at] of [...p.removedAt]) if (now - at > this.init.entryTtlMs) this.dropMark(p, d)
      for (const [d, slot] of [...p.filling]) if (slot.expires <= now) p.filling.delete(d)
    }
  }

  forget (peerId: string): void {
    const p = this.peers.get(peerId)
    if (p === undefined) return
    this.removeAll(peerId, 0)
    if (p.connected) this.connectedCount--
    this.peers.delete(peerId)
  }

  // ---- lookups ----

  dataUrl (peerId: string): string | undefined {
    const p = this.peers.get(peerId)
    return p?.host !== undefined && p.dataPort !== undefined ? formatDataUrl(p.host, p.dataPort) : undefined
  }

  holders (digest: Digest, now: number): PeerHolder[] {
    const set = this.byDigest.get(digest)
    if (set === undefined) return []
    const rows: Array<{ peerId: string, dataUrl: string, score: number, connected: boolean, r: number }> = []
    for (const id of set) {
      const p = this.peers.get(id)
      const slot = p?.blobs.get(digest)
      if (p === undefined || slot === undefined || slot.expires <= now) continue
      if (p.host === undefined || p.dataPort === undefined) continue // we cannot reach it
      if (this.scoreOf(p, now) < QUARANTINE_SCORE) continue
      rows.push({ peerId: id, dataUrl: formatDataUrl(p.host, p.dataPort), score: this.scoreOf(p, now), connected: p.connected, r: Math.random() })
    }
    // Best score first; then connected peers; then random, so equal peers share the load.
    rows.sort((a, b) => (Math.round((b.score - a.score) * 100)) || (Number(b.connected) - Number(a.connected)) || (a.r - b.r))
    return rows.map(({ peerId, dataUrl }) => ({ peerId, dataUrl }))
  }

  /** Connected peers that are filling `digest` right now and can stream it (size known), best first. */
  fillers (digest: Digest, now: number): Array<PeerHolder & { size: number }> {
    const rows: Array<PeerHolder & { size: number, score: number, r: number }> = []
    for (const p of this.peers.values()) {
      const slot = p.filling.get(digest)
      if (slot === undefined || slot.expires <= now || !p.connected) continue
      if (p.host === undefined || p.dataPort === undefined) continue
      const score = this.scoreOf(p, now)
      if (score < QUARANTINE_SCORE) continue
      rows.push({ peerId: p.peerId, dataUrl: formatDataUrl(p.host, p.dataPort), size: slot.size, score, r: Math.random() })
    }
    rows.sort((a, b) => (Math.round((b.score - a.score) * 100)) || (a.r - b.r))
    return rows.map(({ peerId, dataUrl, size }) => ({ peerId, dataUrl, size }))
  }

  /** Connected peers we can reach on the data path (and do not quarantine), with the upstreams they fetch for the mesh. */
  members (now: number): Array<PeerHolder & { upstreams: string[], score: number }> {
    const out: Array<PeerHolder & { upstreams: string[], score: number }> = []
    for (const p of this.peers.values()) {
      if (!p.connected || p.host === undefined || p.dataPort === undefined) continue
      if (this.scoreOf(p, now) < QUARANTINE_SCORE) continue
      out.push({ peerId: p.peerId, dataUrl: formatDataUrl(p.host, p.dataPort), upstreams: p.upstreams, score: this.scoreOf(p, now) })
    }
    return out
  }

  /** Tag names that connected or recently seen peers announced for upstream/repo (at most `max`). */
  repoTags (upstream: string, repo: string, now: number, max = 10_000): string[] {
    const prefix = `${upstream}\u0000${repo}\u0000`
    const out = new Set<string>()
    for (const [key, ids] of this.byTag) {
      if (!key.startsWith(prefix)) continue
      for (const id of ids) {
        const slot = this.peers.get(id)?.tags.get(key)
        if (slot !== undefined && slot.expires > now) { out.add(key.slice(prefix.length)); break }
      }
      if (out.size >= max) break
    }
    return [...out]
  }

  tagRecords (upstream: string, repo: string, tag: string, now: number): PeerTagRecord[] {
    const key = tagKey(upstream, repo, tag)
    const set = this.byTag.get(key)
    if (set === undefined) return []
    const out: PeerTagRecord[] = []
    for (const id of set) {
      const slot = this.peers.get(id)?.tags.get(key)
      if (slot === undefined || slot.expires <= now) continue
      out.push({ peerId: id, record: { ...slot.entry.record, private: false } })
    }
    out.sort((a, b) => b.record.verifiedAt - a.record.verifiedAt)
    return out
  }

  status (now: number): MeshPeerStatus[] {
    return [...this.peers.values()].map(p => {
      const dataUrl = this.dataUrl(p.peerId)
      return {
        peerId: p.peerId,
        addrs: p.addrs,
        ...(dataUrl !== undefined ? { dataUrl } : {}),
        connected: p.connected,
        blobs: p.blobs.size,
        bytes: p.bytes,
        tags: p.tags.size,
        indexBytes: p.cost,
        score: Math.round(this.scoreOf(p, now) * 100) / 100,
        lastSeen: p.lastSeen,
      }
    })
  }

  has (peerId: string): boolean { return this.peers.has(peerId) }
  /** The peer's score as the data path reported it (decayed); 0 for an unknown peer. */
  score (peerId: string, now: number): number {
    const p = this.peers.get(peerId)
    return p === undefined ? 0 : this.scoreOf(p, now)
  }
  touch (peerId: string, now: number): void { this.peer(peerId, now, false) }
}
