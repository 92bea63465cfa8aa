import type { FastifyInstance } from 'fastify'
import type { Config } from './config.js'
import type { Logger } from './logger.js'
import { createMetrics, type Metrics } from './metrics.js'
import { createFsStore } from './store/fs-store.js'
import type { BlobStore } from './store/types.js'
import { createUpstreamClient } from './upstream/client.js'
import type { UpstreamClient } from './upstream/types.js'
import { createResolver, type Resolver } from './content/resolver.js'
import { createHttpServer } from './http/server.js'

export interface Daemon {
  readonly config: Readonly<Config>
  readonly metrics: Metrics
  readonly store: BlobStore
  readonly resolver: Resolver
  /** The client-facing URL, once started. */
  url (): string
  start (): Promise<void>
  stop (): Promise<void>
}

/**
 * The composition root: builds every part from the config. `start()` brings them up in order
 * (store, upstreams, resolver, HTTP); `stop()` takes them down in reverse, so no state is half-written.
 */
export function createDaemon (config: Readonly<Config>, components: { logger: Logger }): Daemon {
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
    }))
  }
  const resolver = createResolver({ store, upstreams, logger, metrics }, {
    tagTtlMs: config.tagTtlMs,
    shareCredentialed: new Set(config.upstreams.filter(u => u.shareWithPeers).map(u => u.name)),
  })
  let ready = false
  const http: FastifyInstance = createHttpServer({ resolver, metrics, logger, ready: () => ready }, {
    upstreams: new Set(upstreams.keys()),
    defaultUpstream: config.defaultUpstream,
  })
  let url = ''
  let state: 'new' | 'starting' | 'started' | 'stopping' | 'stopped' = 'new'

  return {
    config,
    metrics,
    store,
    resolver,
    url: () => url,
    async start () {
      if (state !== 'new') return
      state = 'starting'
      await store.start()
      resolver.start()
      const address = await http.listen({ host: config.listen.host, port: config.listen.port })
      const { port } = http.server.address() as { port: number }
      const host = config.listen.host.includes(':') ? `[${config.listen.host}]` : config.listen.host
      url = `http://${host}:${port}`
      ready = true
      state = 'started'
      logger.info({ url, address, dataDir: config.dataDir, upstreams: config.upstreams.map(u => `${u.name}=${u.url}`) }, 'pullmesh listening')
    },
    async stop () {
      if (state === 'stopping' || state === 'stopped' || state === 'new') { state = 'stopped'; return }
      state = 'stopping'
      ready = false
      await http.close()
      await resolver.stop()
      await Promise.allSettled([...upstreams.values()].map(async u => await u.close()))
      await store.stop()
      state = 'stopped'
      logger.info('pullmesh stopped')
    },
  }
}
