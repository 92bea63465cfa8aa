import type { FastifyInstance } from 'fastify'
import type { Metrics } from '../metrics.js'
import type { BlobStore } from '../store/types.js'
import type { Mesh } from '../mesh/types.js'

export interface StatusComponents {
  metrics: Metrics
  store: BlobStore
  mesh: () => Mesh | undefined
  info: () => { url: string, peerUrl?: string, dataDir: string, upstreams: string[], startedAt: number, maxBytes?: number }
}

export interface NodeStatus {
  status: 'ok'
  version: string
  startedAt: string
  uptimeSeconds: number
  url: string
  dataDir: string
  upstreams: string[]
  cache: { bytes: number, blobs: number, maxBytes?: number, hits: number, misses: number, hitRatio: number | null }
  mesh: { enabled: false } | { enabled: true, peerId: string, addrs: string[], peerUrl?: string, peers: Array<{ peerId: string, addrs: string[], dataUrl?: string, connected: boolean, blobs: number, bytes: number, score: number, lastSeen: string }> }
}

/** `GET /pullmesh/v1/status`: what `pullmesh status` shows. Local clients only (the client-facing listener). */
export function registerStatusRoutes (app: FastifyInstance, c: StatusComponents, version: string): void {
  app.get('/pullmesh/v1/status', async (): Promise<NodeStatus> => {
    const info = c.info()
    const lookups = await c.metrics.cacheLookups.get()
    let hits = 0
    let misses = 0
    for (const v of lookups.values) {
      if (v.labels.result === 'hit') hits += v.value
      else misses += v.value
    }
    const usage = c.store.usage()
    const mesh = c.mesh()
    const ms = mesh?.status()
    return {
      status: 'ok',
      version,
      startedAt: new Date(info.startedAt).toISOString(),
      uptimeSeconds: Math.round((Date.now() - info.startedAt) / 1000),
      url: info.url,
      dataDir: info.dataDir,
      upstreams: info.upstreams,
      cache: { bytes: usage.bytes, blobs: usage.blobs, ...(info.maxBytes !== undefined ? { maxBytes: info.maxBytes } : {}), hits, misses, hitRatio: hits + misses > 0 ? hits / (hits + misses) : null },
      mesh: ms === undefined
        ? { enabled: false }
        : {
            enabled: true,
            peerId: ms.peerId,
            addrs: ms.addrs,
            ...(info.peerUrl !== undefined ? { peerUrl: info.peerUrl } : {}),
            peers: ms.peers.map(p => ({ ...p, lastSeen: new Date(p.lastSeen).toISOString() })),
          },
    }
  })
}
