// Shared by the mesh-scale orchestrator (../mesh-scale.ts) and its worker processes
// (./mesh-scale-worker.ts): the synthetic content and the messages between them.
import { createHash } from 'node:crypto'
import { sha256Of, type Digest } from '../../../src/oci/digest.js'

export const SIM_MEDIA_TYPE = 'application/vnd.oci.image.layer.v1.tar+gzip'

/** Blob `j` of node `node` in run `run`: 64 deterministic bytes, so the orchestrator knows every digest. */
export function simBlob (run: string, node: number, j: number): { digest: Digest, bytes: Buffer } {
  const h = createHash('sha256').update(`pullmesh-sim/${run}/${node}/${j}`).digest()
  const bytes = Buffer.concat([h, createHash('sha256').update(h).digest()])
  return { digest: sha256Of(bytes), bytes }
}

export interface WorkerMemory { rss: number, heapUsed: number, external: number, arrayBuffers: number }

/** Bytes moved by every TCP socket of the worker (all of them are mesh connections), payload only. */
export interface WorkerBytes { sent: number, received: number, sockets: number }

export interface NodeSnapshot {
  index: number
  peerId: string
  /** Peers with an open connection (libp2p's view). */
  connected: number
  counters: {
    gossipSentMessages: number
    gossipSentBytes: number
    gossipReceived: number
    inventoryFetches: number
    inventoryFull: number
    inventoryDelta: number
    inventoryUnchanged: number
    inventoryFailures: number
    inventoryEntriesSent: number
    inventoryEntriesReceived: number
    indexBytes: number
    indexMaxBytes: number
    indexEvicted: number
    indexRefused: number
    /** Gossip messages we dropped, by reason (rate limits, not connected, replays ...). */
    gossipDropped: Record<string, number>
  }
  /** ms from just before mesh.start() to the first holder of the probe digest (undefined: not yet). */
  ttfMs?: number
  /** Blob entries the peer index holds (sum over peers of status().peers[].blobs). */
  indexedBlobs: number
}

export interface WorkerSnapshot { mem: WorkerMemory, bytes: WorkerBytes, nodes: NodeSnapshot[], cpuUserMs: number, cpuSystemMs: number }

export type Request =
  | { op: 'init', run: string, nodes: number[], k: number, dir: string, routing?: 'gossip' | 'dht' | 'both', dhtLookupMs?: number }
  | { op: 'start', index: number, bootstrap: string[], probe?: { digest: Digest, holder: string }, probeTimeoutMs: number }
  | { op: 'snapshot', gc: boolean }
  /** perNode: with routing dht, each node looks up at most this many of the samples (a DHT lookup costs a network round). */
  | { op: 'lookup', samples: Array<{ digest: Digest, holder: string, node: number }>, perNode?: number }
  | { op: 'churn', adds: number, periodMs: number }
  | { op: 'stop' }

export type Reply =
  | { op: 'init', before: WorkerMemory, afterStores: WorkerMemory }
  | { op: 'start', addr: string, peerId: string }
  | { op: 'snapshot', snapshot: WorkerSnapshot }
  /** latenciesNs: one per lookup; found/asked: the true holder was among holders(). */
  | { op: 'lookup', latenciesNs: Float64Array, asked: number, found: number, anyHolder: number }
  | { op: 'churn', added: Array<{ node: number, j: number }>, deleted: Array<{ node: number, j: number }> }
  | { op: 'stop', stopped: number }

export interface Envelope<T> { id: number, body: T }
export interface ErrorReply { id: number, error: string }
