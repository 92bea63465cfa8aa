import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client'

/** Every metric the daemon exports, on a registry of its own (no global state). */
export interface Metrics {
  readonly registry: Registry
  /** HTTP requests by route and status. */
  readonly httpRequests: Counter<'route' | 'method' | 'status'>
  readonly httpDuration: Histogram<'route'>
  /** Cache lookups by kind (manifest|blob) and result (hit|miss). */
  readonly cacheLookups: Counter<'kind' | 'result'>
  /** Bytes sent to clients by source (store|fill|peer|upstream). */
  readonly bytesServed: Counter<'source'>
  /** Requests sent upstream by upstream name, method, kind and outcome status (or error code). */
  readonly upstreamRequests: Counter<'upstream' | 'kind' | 'status'>
  readonly upstreamErrors: Counter<'upstream' | 'code'>
  readonly upstreamBytes: Counter<'upstream'>
  /** Tag answers served stale because the upstream failed. */
  readonly staleServed: Counter<'upstream'>
  readonly storeBytes: Gauge
  readonly storeBlobs: Gauge
  readonly verificationFailures: Counter<'source'>
  readonly fillsActive: Gauge
  readonly evictions: Counter<'reason'>
  /** Mesh: peers connected, bytes exchanged with peers, mesh hits. */
  readonly peersConnected: Gauge
  readonly peerBytes: Counter<'direction'>
  readonly meshHits: Counter<'kind'>
  readonly peerErrors: Counter<'reason'>
  /** Fetches asked of the node chosen to fetch for the mesh, and those that failed (then fetched here). */
  readonly delegations: Counter<'kind'>
  readonly delegationFailures: Counter<'kind'>
  /** Fetches this node made (or joined) on a peer's behalf. */
  readonly servedForPeers: Counter<'kind'>
  /** Content that came from the mesh instead of this node's own upstream request. */
  readonly upstreamAvoided: Counter<'kind'>
}

export function createMetrics (): Metrics {
  const registry = new Registry()
  collectDefaultMetrics({ register: registry, prefix: 'pullmesh_process_' })
  const r = [registry]
  return {
    registry,
    httpRequests: new Counter({ name: 'pullmesh_http_requests_total', help: 'HTTP requests by route and status', labelNames: ['route', 'method', 'status'], registers: r }),
    httpDuration: new Histogram({ name: 'pullmesh_http_request_duration_seconds', help: 'Time to response headers', labelNames: ['route'], buckets: [0.001, 0.005, 0.02, 0.1, 0.5, 2, 10], registers: r }),
    cacheLookups: new Counter({ name: 'pullmesh_cache_lookups_total', help: 'Cache hits and misses by kind (manifest|blob)', labelNames: ['kind', 'result'], registers: r }),
    bytesServed: new Counter({ name: 'pullmesh_bytes_served_total', help: 'Bytes sent to clients by source', labelNames: ['source'], registers: r }),
    upstreamRequests: new Counter({ name: 'pullmesh_upstream_requests_total', help: 'Requests sent to upstream registries', labelNames: ['upstream', 'kind', 'status'], registers: r }),
    upstreamErrors: new Counter({ name: 'pullmesh_upstream_errors_total', help: 'Upstream failures by error code', labelNames: ['upstream', 'code'], registers: r }),
    upstreamBytes: new Counter({ name: 'pullmesh_upstream_bytes_total', help: 'Blob bytes received from upstream registries', labelNames: ['upstream'], registers: r }),
    staleServed: new Counter({ name: 'pullmesh_stale_tags_served_total', help: 'Tag lookups answered from cache because the upstream failed', labelNames: ['upstream'], registers: r }),
    storeBytes: new Gauge({ name: 'pullmesh_store_bytes', help: 'Bytes of verified content in the store', registers: r }),
    storeBlobs: new Gauge({ name: 'pullmesh_store_blobs', help: 'Blobs and manifests in the store', registers: r }),
    verificationFailures: new Counter({ name: 'pullmesh_verification_failures_total', help: 'Content rejected because its digest or size was wrong', labelNames: ['source'], registers: r }),
    evictions: new Counter({ name: 'pullmesh_evictions_total', help: 'Blobs evicted by reason (size, max-age, manual)', labelNames: ['reason'], registers: r }),
    fillsActive: new Gauge({ name: 'pullmesh_fills_active', help: 'Cache fills in progress', registers: r }),
    peersConnected: new Gauge({ name: 'pullmesh_mesh_peers_connected', help: 'Mesh peers connected', registers: r }),
    peerBytes: new Counter({ name: 'pullmesh_mesh_peer_bytes_total', help: 'Bytes exchanged with peers (direction: in|out)', labelNames: ['direction'], registers: r }),
    meshHits: new Counter({ name: 'pullmesh_mesh_hits_total', help: 'Misses served from a peer', labelNames: ['kind'], registers: r }),
    delegations: new Counter({ name: 'pullmesh_mesh_delegated_fetches_total', help: 'Fetches asked of the node chosen to fetch for the mesh', labelNames: ['kind'], registers: r }),
    delegationFailures: new Counter({ name: 'pullmesh_mesh_delegated_failures_total', help: 'Delegated fetches that failed and were fetched here instead', labelNames: ['kind'], registers: r }),
    servedForPeers: new Counter({ name: 'pullmesh_mesh_fetches_for_peers_total', help: 'Fetches made or joined on a peer\'s behalf', labelNames: ['kind'], registers: r }),
    upstreamAvoided: new Counter({ name: 'pullmesh_mesh_upstream_fetches_avoided_total', help: 'Content taken from the mesh instead of from the upstream', labelNames: ['kind'], registers: r }),
    peerErrors: new Counter({ name: 'pullmesh_mesh_peer_errors_total', help: 'Peer fetch failures by reason', labelNames: ['reason'], registers: r }),
  }
}
