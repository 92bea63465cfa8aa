import type { FastifyInstance } from 'fastify'
import type { Config } from './config.js'
import type { Logger } from './logger.js'
import { createMetrics, type Metrics } from './metrics.js'
import { createFsStore } from './store/fs-store.js'
import type { BlobStore } from './store/types.js'
import { createUpstreamClient } from './upstream/client.js'
import type { UpstreamClient } from './upstream/types.js'
import { networkInterfaces } from 'node:os'
import { createResolver, type Resolver } from './content/resolver.js'
import { createListings } from './content/listings.js'
import type { PeerContent } from './content/types.js'
import { createHttpServer } from './http/server.js'
import { loadTlsSync, reloadTls } from './http/tls.js'
import type { Server as HttpsServer } from 'node:https'
import { registerStatusRoutes } from './http/status-routes.js'
import { registerAdminRoutes } from './http/admin-routes.js'
import { createEvictor, type Evictor } from './store/eviction.js'
import { createPeerServer } from './http/peer-server.js'
import type { Mesh } from './mesh/types.js'
import { dataPathKey } from './peer-protocol.js'
import { upstreamId } from './content/delegation.js'
import { parseDnsName } from './mesh/dns-discovery.js'
import { encodeMeshKey, loadMeshKey } from './mesh/psk.js'
import { warmUpHttpClient } from './upstream/warm-up.js'

export interface Daemon {
  readonly config: Readonly<Config>
  readonly metrics: Metrics
  readonly store: BlobStore
  readonly resolver: Resolver
  readonly evictor: Evictor
  /** The mesh, once started (undefined with --no-mesh). */
  mesh (): Mesh | undefined
  /** The client-facing URL, once started. */
  url (): string
  /** The peer data path URL, once started (undefined with --no-mesh). */
  peerUrl (): string | undefined
  start (): Promise<void>
  stop (): Promise<void>
  /** Reloads what can change without a restart: the client API's TLS certificate and key. Never throws. */
  reload (): Promise<void>
}

/**
 * The composition root: builds every part from the config. `start()` brings them up in order
 * (store, upstreams, resolver, HTTP); `stop()` takes them down in reverse, so no state is half-written.
 */
export function createDaemon (config: Readonly<Config>, components: { logger: Logger, version?: string }): Daemon {
  const logger = components.logger
  const metrics = createMetrics()
  const store = createFsStore({ logger, metrics }, { dataDir: config.dataDir })
  const upstreams = new Map<string, UpstreamClient>()
  for (const u of config.upstreams) {
    upstreams.set(u.name, createUpstreamClient({ logger, metrics }, {
      name: u.name,
      url: u.url,
      ...(u.credentials !== undefined ? { credentials: u.credentials } : {}),
      connectTimeoutMs: config.upstreamTimeouts.connectMs,
      headersTimeoutMs: config.upstreamTimeouts.headersMs,
      bodyIdleTimeoutMs: config.upstreamTimeouts.bodyIdleMs,
      maxAttempts: config.upstreamMaxAttempts,
      retryBaseMs: 200,
      deadlineMs: config.upstreamTimeouts.deadlineMs,
      breakerHoldMs: config.upstreamTimeouts.breakerHoldMs,
      ...(u.proxy !== undefined ? { proxy: u.proxy } : {}),
    }))
  }
  // The mesh needs the data path's port, known only once it listens; the resolver is built now and
  // sees the peers through this late-bound view, which answers "no peers" until the mesh is up.
  let peers: (PeerContent & { close: () => Promise<void> }) | undefined
  const peerView: PeerContent = {
    blobSources: (d) => peers?.blobSources(d) ?? [],
    fetcherFor: (u, k) => peers?.fetcherFor(u, k),
    delegateBlob: (f, u, r, d) => {
      if (peers === undefined) throw new Error('the mesh is not running')
      return peers.delegateBlob(f, u, r, d)
    },
    delegateManifest: async (f, u, r, ref, max, signal) => await peers?.delegateManifest(f, u, r, ref, max, signal),
    announceFilling: (d, size) => peers?.announceFilling(d, size),
    fillingEnded: (d, ok) => peers?.fillingEnded(d, ok),
    fetchSmall: async (d, max, signal) => await peers?.fetchSmall(d, max, signal),
    tagRecords: (u, r, t) => peers?.tagRecords(u, r, t) ?? [],
  }
  const upstreamIds = new Map(config.upstreams.map(u => [u.name, upstreamId(u.url)]))
  // The upstreams this node fetches for the mesh: those whose content it may share.
  const sharedUpstreamIds = [...new Set(config.upstreams.filter(u => u.credentials === undefined || u.shareWithPeers).map(u => upstreamIds.get(u.name)!))]
  const resolver = createResolver({ store, upstreams, logger, metrics, ...(config.mesh.enabled ? { peers: peerView } : {}) }, {
    tagTtlMs: config.tagTtlMs,
    shareCredentialed: new Set(config.upstreams.filter(u => u.shareWithPeers).map(u => u.name)),
    upstreamIds,
    delegate: config.mesh.delegate,
    // Only nodes that hold the mesh key may tell us what a tag resolves to while the upstream is up.
    delegateTags: config.mesh.meshKeyFile !== undefined,
    // With the upstream unreachable, a tag peers can answer waits about one connect attempt plus a peer timeout.
    outageProbeMs: config.upstreamTimeouts.connectMs + config.mesh.peerTimeoutMs,
  })
  const listings = createListings({ upstreams, logger, metrics, peerTags: (u, r) => mesh?.repoTags(u, r) ?? [] }, { referrersTtlMs: config.tagTtlMs, tagsTtlMs: Math.min(config.tagTtlMs, 30_000) })
  let ready = false
  const evictor: Evictor = createEvictor({ store, logger, metrics, busy: () => resolver.activeFills() }, {
    maxBytes: config.maxBytes,
    ...(config.maxAgeMs !== undefined ? { maxAgeMs: config.maxAgeMs } : {}),
  })
  const routing = { upstreams: new Set(upstreams.keys()), defaultUpstream: config.defaultUpstream }
  const startedAt = Date.now()
  const extraRoutes = (app: FastifyInstance): void => {
    registerStatusRoutes(app, {
      metrics,
      store,
      mesh: () => mesh,
      info: () => ({ url, ...(peerUrl !== undefined ? { peerUrl } : {}), dataDir: config.dataDir, upstreams: config.upstreams.map(u => `${u.name}=${u.url}`), startedAt, maxBytes: config.maxBytes }),
    }, components.version ?? 'dev')
    registerAdminRoutes(app, { resolver, store, evictor, metrics, logger }, routing)
  }
  const http: FastifyInstance = createHttpServer({ resolver, listings, metrics, logger, ready: () => ready, extraRoutes }, routing, {
    shutdownGraceMs: config.shutdownGraceMs,
    ...(config.tls !== undefined ? { tls: loadTlsSync(config.tls) } : {}),
  })
  let mesh: Mesh | undefined
  let peerHttp: FastifyInstance | undefined
  let peerUrl: string | undefined
  let url = ''
  let state: 'new' | 'starting' | 'started' | 'stopping' | 'stopped' = 'new'

  async function startMesh (): Promise<void> {
    // Both keys come from the parsed pnet key: files that differ only in line endings give the same mesh.
    const psk = config.mesh.meshKeyFile !== undefined ? await loadMeshKey(config.mesh.meshKeyFile) : undefined
    const meshKey = psk !== undefined ? encodeMeshKey(psk) : undefined
    const key = psk !== undefined ? dataPathKey(psk) : undefined
    // The data path checks that a request was signed for this node: it needs our peer id before libp2p starts.
    const { loadOrCreatePeerKey } = await import('./mesh/peer-key.js')
    const { peerIdFromPrivateKey } = await import('@libp2p/peer-id')
    const self = peerIdFromPrivateKey((await loadOrCreatePeerKey(config.dataDir)).key).toString()
    const openWarning = openMeshWarning(config.mesh, psk !== undefined)
    if (openWarning !== undefined) logger.warn(openWarning)
    peerHttp = createPeerServer({ resolver, metrics, logger }, { self, ...(key !== undefined ? { key } : {}) })
    await peerHttp.listen({ host: config.mesh.peerListen.host, port: config.mesh.peerListen.port })
    // libp2p takes about half a second to load: only a node with the mesh on pays for it.
    // The peer source (and undici's full index, which it imports) too.
    const [{ createMesh }, { createPeerContent }] = await Promise.all([import('./mesh/index.js'), import('./content/peer-source.js')])
    const dataPort = (peerHttp.server.address() as { port: number }).port
    peerUrl = `http://${reachableHost(config.mesh.peerListen.host)}:${dataPort}`
    mesh = createMesh({ logger, metrics, store }, {
      dataDir: config.dataDir,
      listen: config.mesh.p2pListen,
      bootstrap: config.mesh.bootstrap,
      mdns: config.mesh.mdns,
      mdnsIntervalMs: config.mesh.mdnsIntervalMs,
      bootstrapDns: config.mesh.bootstrapDns.map(n => parseDnsName(n)!),
      peerExchange: config.mesh.peerExchange,
      dataPort,
      upstreams: config.mesh.delegate ? sharedUpstreamIds : [],
      routing: config.mesh.routing,
      dht: { lookupMs: config.mesh.dhtDeadlineMs },
      ...(meshKey !== undefined ? { meshKey } : {}),
    })
    await mesh.start()
    if (mesh.status().peerId !== self) throw new Error(`the mesh started as ${mesh.status().peerId}, not as ${self} (peer-key replaced during start?)`)
    peers = createPeerContent({ mesh, metrics, logger }, { timeoutMs: config.mesh.peerTimeoutMs, maxBytes: config.maxBytes, minRate: config.mesh.peerMinRate, ...(key !== undefined ? { key } : {}) })
    logger.info({ peerUrl, p2p: mesh.multiaddrs(), mdns: config.mesh.mdns, private: meshKey !== undefined }, 'mesh started')
  }

  return {
    config,
    metrics,
    store,
    resolver,
    evictor,
    mesh: () => mesh,
    url: () => url,
    peerUrl: () => peerUrl,
    async start () {
      if (state !== 'new') return
      state = 'starting'
      // The first upstream fetch of a fresh process would pay undici's first-use cost (see warm-up.ts).
      const warming = warmUpHttpClient()
      await store.start()
      resolver.start()
      evictor.start()
      if (config.mesh.enabled) await startMesh()
      const address = await http.listen({ host: config.listen.host, port: config.listen.port })
      const { port } = http.server.address() as { port: number }
      const host = config.listen.host.includes(':') ? `[${config.listen.host}]` : config.listen.host
      url = `${config.tls !== undefined ? 'https' : 'http'}://${host}:${port}`
      await warming
      ready = true
      state = 'started'
      logger.info({ url, address, dataDir: config.dataDir, upstreams: config.upstreams.map(u => `${u.name}=${u.url}`) }, 'pullmesh listening')
    },
    async reload () {
      if (config.tls === undefined || state !== 'started') return
      try {
        await reloadTls(http.server as unknown as HttpsServer, config.tls)
        logger.info({ cert: config.tls.certFile }, 'TLS certificate reloaded')
      } catch (err) {
        logger.error({ err, cert: config.tls.certFile }, 'TLS reload failed; the current certificate stays in use')
      }
    },
    async stop () {
      if (state === 'stopping' || state === 'stopped' || state === 'new') { state = 'stopped'; return }
      state = 'stopping'
      ready = false
      await http.close()
      await peerHttp?.close()
      await mesh?.stop()
      await resolver.stop()
      await evictor.stop()
      await peers?.close()
      await Promise.allSettled([...upstreams.values()].map(async u => await u.close()))
      await store.stop()
      state = 'stopped'
      logger.info('pullmesh stopped')
    },
  }
}

/**
 * The one start-up line for an open (keyless) mesh that listens on every interface: anyone who can reach
 * those ports can join, announce and read. Undefined when the mesh is keyed or listens on specific addresses.
 */
export function openMeshWarning (mesh: Readonly<Config['mesh']>, keyed: boolean): string | undefined {
  if (keyed) return undefined
  const wild = [
    ...mesh.p2pListen.filter(a => /^\/ip4\/0\.0\.0\.0\/|^\/ip6\/::\//.test(a)),
    ...(mesh.peerListen.host === '0.0.0.0' || mesh.peerListen.host === '::' ? [`${mesh.peerListen.host.includes(':') ? `[${mesh.peerListen.host}]` : mesh.peerListen.host}:${mesh.peerListen.port} (data path)`] : []),
  ]
  if (wild.length === 0) return undefined
  return `open mesh on all interfaces (${wild.join(', ')}): any host that can reach these ports can join the mesh, ` +
    'announce content and read every shared blob. To close it, create a key with "pullmesh keygen FILE" and start ' +
    'every node with "--mesh-key FILE", or listen on a specific address (--p2p-listen, --peer-listen)'
}

/** For a wildcard listen address, the first non-internal IPv4 address: what a peer could reach. */
function reachableHost (host: string): string {
  if (host !== '0.0.0.0' && host !== '::') return host.includes(':') ? `[${host}]` : host
  for (const addrs of Object.values(networkInterfaces())) {
    for (const a of addrs ?? []) if (a.family === 'IPv4' && !a.internal) return a.address
  }
  return '127.0.0.1'
}
