// Discovery where multicast does not reach: a DNS name that resolves to every peer behind it (a
// Kubernetes headless Service, a round-robin record for a build farm), resolved at start and again
// every interval. Every address that is not our own and that we hold no connection to is handed to
// `dial`; what to do with a peer once connected is the mesh's business.
import { lookup as dnsLookup } from 'node:dns/promises'
import { networkInterfaces } from 'node:os'
import type { Logger } from '../logger.js'

export interface DnsName { host: string, port: number }

export interface DnsDiscoveryComponents {
  logger: Logger
  /** Dials a multiaddr without a peer id (the id is learned in the handshake). */
  dial: (multiaddr: string) => void
  /** IPs we hold a connection to now. */
  connectedHosts: () => Set<string>
  /** Name → addresses; the system resolver (getaddrinfo: /etc/hosts, then DNS) by default. */
  resolve?: (host: string) => Promise<string[]>
}

export interface DnsDiscoveryInit {
  names: DnsName[]
  /** How often each name is resolved again (default 30 s). */
  intervalMs?: number
}

export interface DnsDiscovery {
  start: () => void
  stop: () => void
  /** Resolves every name now and dials what is new (for tests, and after a network change). */
  refresh: () => Promise<void>
}

/** `NAME` or `NAME:PORT` (default port 4001); undefined if malformed. */
export function parseDnsName (s: string, defaultPort = 4001): DnsName | undefined {
  const m = /^([A-Za-z0-9]([A-Za-z0-9-]{0,62}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}[A-Za-z0-9])?)*\.?)(?::(\d{1,5}))?$/.exec(s.trim())
  if (m === null) return undefined
  const port = m[5] !== undefined ? Number(m[5]) : defaultPort
  if (port < 1 || port > 65535) return undefined
  return { host: m[1]!, port }
}

const MAX_ADDRESSES_PER_NAME = 256

export function createDnsDiscovery (components: DnsDiscoveryComponents, init: DnsDiscoveryInit): DnsDiscovery {
  const log = components.logger
  const resolve = components.resolve ?? (async (host: string) => (await dnsLookup(host, { all: true })).map(a => a.address))
  const intervalMs = init.intervalMs ?? 30_000
  let timer: NodeJS.Timeout | undefined
  let running = false

  function ownHosts (): Set<string> {
    const own = new Set<string>()
    for (const list of Object.values(networkInterfaces())) for (const a of list ?? []) own.add(a.address)
    return own
  }

  async function refresh (): Promise<void> {
    const own = ownHosts()
    const connected = components.connectedHosts()
    for (const name of init.names) {
      let addrs: string[]
      try {
        addrs = await resolve(name.host)
      } catch (err) {
        log.warn({ name: name.host, err: (err as { code?: string }).code ?? String(err) }, 'bootstrap DNS name did not resolve; trying again later')
        continue
      }
      if (!running) return
      let dialed = 0
      for (const ip of addrs.slice(0, MAX_ADDRESSES_PER_NAME)) {
        if (own.has(ip) || connected.has(ip)) continue
        components.dial(ip.includes(':') ? `/ip6/${ip}/tcp/${name.port}` : `/ip4/${ip}/tcp/${name.port}`)
        dialed++
      }
      log.debug({ name: name.host, addresses: addrs.length, dialed }, 'bootstrap DNS name resolved')
    }
  }

  return {
    start () {
      if (running) return
      running = true
      void refresh()
      timer = setInterval(() => { void refresh() }, intervalMs)
      timer.unref()
    },
    stop () {
      running = false
      if (timer !== undefined) clearInterval(timer)
      timer = undefined
    },
    refresh,
  }
}
