import type { Digest } from '../oci/digest.js'
import type { TagRecord } from '../store/types.js'
import type { DhtOptions, RoutingMode } from './routing.js'

/** A peer that announced it holds some content, and where its data path listens. */
export interface PeerHolder { peerId: string, dataUrl: string }

/** A tag record as announced by a peer (never private: private records are not announced). */
export interface PeerTagRecord { peerId: string, record: TagRecord }

export interface MeshPeerStatus {
  peerId: string
  addrs: string[]
  /** Known once the peer told us its data port and we have (or recently had) a connection to it. */
  dataUrl?: string
  connected: boolean
  blobs: number
  bytes: number
  /** Tag records indexed from this peer. */
  tags?: number
  /** Accounted index memory this peer's entries take (bytes). */
  indexBytes?: number
  score: number
  /** gossipsub's own score of the peer (below -400 its gossip is ignored altogether). */
  gossipScore?: number
  /** ms since epoch of the last message, inventory or connection event from this peer. */
  lastSeen: number
}

export interface MeshStatus { peerId: string, addrs: string[], peers: MeshPeerStatus[] }

/** good: a verified transfer; bad: wrong bytes, stall, error; missing: announced it, then answered 404. */
export type PeerOutcome = 'good' | 'bad' | 'missing'

/** A connected peer reachable on the data path, and the upstreams it fetches for the mesh (ids). */
export interface MeshMember extends PeerHolder { upstreams: string[], score: number }

export interface Mesh {
  /** Idempotent. */
  start (): Promise<void>
  /** Idempotent; withdraws our announcements (best effort), then stops libp2p. */
  stop (): Promise<void>
  /** Peers that hold `digest`, best first (score, then connected). Reads only the local index: never waits on the network. */
  holders (digest: Digest): PeerHolder[]
  /**
   * Peers that hold `digest`: the local index at once when it knows any, else the DHT (routing 'dht' or
   * 'both'), asked for at most `deadlineMs` (default: the mesh's DHT lookup deadline). [] on a miss.
   * Rejects only when `signal` aborts.
   */
  findHolders (digest: Digest, o?: { signal?: AbortSignal, deadlineMs?: number }): Promise<PeerHolder[]>
  /** Tags peers announced for upstream/repo; local index only. */
  repoTags (upstream: string, repo: string): string[]
  /** Connected peers that are filling `digest` now and can stream it; local index only. */
  fillers (digest: Digest): Array<PeerHolder & { size: number }>
  /** Connected peers reachable on the data path (the candidates for fetching on the mesh's behalf). */
  members (): MeshMember[]
  /** Our libp2p peer id ('' before start). */
  peerId (): string
  /** Announces at once (no batching) that we are filling `digest` and can stream it. */
  announceFilling (digest: Digest, size: number): void
  /** The announced fill ended without the blob (on success, the store's `added` announcement replaces it). */
  fillingEnded (digest: Digest, ok: boolean): void
  /** Tag records peers announced for upstream/repo:tag, freshest verifiedAt first. Local index only. */
  tagRecords (upstream: string, repo: string, tag: string): PeerTagRecord[]
  /** The data path reports how a peer behaved: bad (wrong bytes, stall, error) lowers its score for later requests. */
  report (peerId: string, outcome: PeerOutcome): void
  status (): MeshStatus
  /** Our listen multiaddrs, each ending in /p2p/<our peer id> (empty before start). */
  multiaddrs (): string[]
}

export interface MeshInit {
  dataDir: string
  /** Multiaddrs to listen on, e.g. /ip4/0.0.0.0/tcp/4001 or /ip4/127.0.0.1/tcp/0. */
  listen: string[]
  /** Multiaddrs of peers to dial at start (and re-dial while disconnected); each must end in /p2p/<id>. */
  bootstrap: string[]
  mdns: boolean
  /** mDNS query interval (default 60 s; see membership.ts). */
  mdnsIntervalMs?: number
  /** DNS names resolving to peers, re-resolved every `dnsIntervalMs` (default 30 s). */
  bootstrapDns?: Array<{ host: string, port: number }>
  dnsIntervalMs?: number
  /** Dial peers we learn of from other peers' announcements (default true). */
  peerExchange?: boolean
  /** pnet pre-shared key file contents; when set, only peers with the same key can connect. */
  meshKey?: Uint8Array
  /** TCP port of our plain-HTTP data path, announced to peers. */
  dataPort: number
  /** Ids of the upstreams this node fetches for the mesh (shared, not credentialed), announced to peers. */
  upstreams?: string[]
  /** How long a disconnected peer's holdings are kept (default 30 s). */
  peerTtlMs?: number
  /** How often holdings are re-fetched from connected peers (default 60 s). Entries expire after 3 intervals. */
  inventoryIntervalMs?: number
  /** Budget of the peer index in accounted bytes (default 128 MiB), shared fairly between connected peers. */
  indexBudgetBytes?: number
  /** Gossip accepted per signer (and 4× per forwarder); see DEFAULT_GOSSIP_LIMITS in announce.ts. */
  gossipLimits?: { messagesPerSec?: number, messagesBurst?: number, bytesPerSec?: number, bytesBurst?: number, forwarderFactor?: number }
  /** How long gossipsub remembers a message id (default 2 min); replays after it are stopped by the sequence check. For tests. */
  gossipSeenTtlMs?: number
  /** Content routing: 'gossip' (full inventory), 'dht' or 'both' (default); see ./routing.ts. */
  routing?: RoutingMode
  /** DHT lookup deadline and (re-)provide pacing. */
  dht?: DhtOptions
}
