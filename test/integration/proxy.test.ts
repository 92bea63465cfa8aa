// Upstreams behind a forward proxy: HTTP_PROXY / HTTPS_PROXY / NO_PROXY as the environment gives
// them, and a per-upstream --upstream-proxy. The proxy is a small one written here that records
// what goes through it (CONNECT tunnels and absolute-form requests).
import { randomBytes } from 'node:crypto'
import { mkdtemp, rm } from 'node:fs/promises'
import { createServer, request as httpRequest, type Server } from 'node:http'
import { connect, type Socket } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest'
import { buildConfig, type RawSettings } from '../../src/config.js'
import { ConfigError } from '../../src/errors.js'
import { createDaemon, type Daemon } from '../../src/daemon.js'
import { createLogger } from '../../src/logger.js'
import { startFaultUpstream, type FaultUpstream } from '../helpers/fault-upstream.js'
import { listen, simpleRequest, trackSockets } from '../helpers/net.js'

interface ForwardProxy { url: string, seen: string[], close: () => Promise<void> }

/** A forward proxy on 127.0.0.1: CONNECT tunnels and absolute-form requests, each one recorded. */
async function startForwardProxy (): Promise<ForwardProxy> {
  const seen: string[] = []
  const tunnels = new Set<Socket>()
  const server: Server = createServer((req, res) => {
    seen.push(`${req.method ?? ''} ${req.url ?? ''}`)
    const u = new URL(req.url ?? '')
    const out = httpRequest({ host: u.hostname, port: u.port, path: u.pathname + u.search, method: req.method, headers: req.headers }, up => {
      res.writeHead(up.statusCode ?? 502, up.headers)
      up.pipe(res)
    })
    out.on('error', () => { res.destroy() })
    req.pipe(out)
  })
  server.on('connect', (req, client: Socket, head: Buffer) => {
    seen.push(`CONNECT ${req.url ?? ''}`)
    const [host, port] = (req.url ?? '').split(':')
    const target = connect(Number(port), host, () => {
      client.write('HTTP/1.1 200 Connection Established\r\n\r\n')
      if (head.length > 0) target.write(head)
      target.pipe(client)
      client.pipe(target)
    })
    tunnels.add(target); tunnels.add(client)
    const end = (): void => { target.destroy(); client.destroy() }
    target.on('error', end); client.on('error', end)
    target.once('close', end); client.once('close', end)
  })
  const { closeServer } = trackSockets(server)
  const port = await listen(server)
  return {
    url: `http://127.0.0.1:${port}`,
    seen,
    close: async () => { for (const s of tunnels) s.destroy(); await closeServer() },
  }
}

let proxy: ForwardProxy
let a: FaultUpstream
let b: FaultUpstream
let blobA: Buffer
let blobB: Buffer
let digestA: string
let digestB: string
const daemons: Array<{ d: Daemon, dir: string }> = []

beforeAll(async () => {
  proxy = await startForwardProxy()
  a = await startFaultUpstream()
  b = await startFaultUpstream()
  blobA = randomBytes(200_000); blobB = randomBytes(100_000)
  digestA = a.addBlob('team/app', blobA)
  digestB = b.addBlob('team/app', blobB)
})
afterAll(async () => {
  await proxy.close(); await a.close(); await b.close()
})
afterEach(async () => {
  for (const { d, dir } of daemons.splice(0)) { await d.stop(); await rm(dir, { recursive: true, force: true }) }
  proxy.seen.length = 0; a.requests.length = 0; b.requests.length = 0
})

async function startDaemon (settings: RawSettings, env: Record<string, string>): Promise<Daemon> {
  const dir = await mkdtemp(join(tmpdir(), 'pm-proxy-'))
  const d = createDaemon(buildConfig({
    listen: '127.0.0.1:0', dataDir: dir, upstream: [`a.test=${a.url}`, `b.test=${b.url}`], mesh: false, mdns: false, ...settings,
  }, env), { logger: createLogger('silent') })
  await d.start()
  daemons.push({ d, dir })
  return d
}

async function pull (d: Daemon, upstream: string, digest: string): Promise<Buffer> {
  const r = await simpleRequest(`${d.url()}/v2/${upstream}/team/app/blobs/${digest}`)
  expect(r.status).toBe(200)
  return r.body
}

const through = (port: number): string[] => proxy.seen.filter(s => s.includes(`127.0.0.1:${port}`))

describe('upstream proxies', () => {
  it('sends upstream requests through HTTP_PROXY, and straight to the hosts NO_PROXY names', async () => {
    const d = await startDaemon({}, { HTTP_PROXY: proxy.url, NO_PROXY: `localhost,127.0.0.1:${b.port}` })
    expect((await pull(d, 'a.test', digestA)).equals(blobA)).toBe(true)
    expect((await pull(d, 'b.test', digestB)).equals(blobB)).toBe(true)
    expect(through(a.port).length).toBeGreaterThan(0)
    expect(a.requests.some(r => r.path === `/v2/team/app/blobs/${digestA}`)).toBe(true)
    expect(through(b.port)).toEqual([])
    expect(b.requests.some(r => r.path === `/v2/team/app/blobs/${digestB}`)).toBe(true)
  })

  it('reads the lower-case variables too', async () => {
    const d = await startDaemon({}, { http_proxy: proxy.url, no_proxy: `127.0.0.1:${b.port}` })
    await pull(d, 'a.test', digestA)
    await pull(d, 'b.test', digestB)
    expect(through(a.port).length).toBeGreaterThan(0)
    expect(through(b.port)).toEqual([])
  })

  it('gives one upstream its own proxy with --upstream-proxy, and "direct" opts one out of the environment', async () => {
    const d = await startDaemon({ upstreamProxy: [`a.test=${proxy.url}`] }, {})
    await pull(d, 'a.test', digestA)
    await pull(d, 'b.test', digestB)
    expect(through(a.port).length).toBeGreaterThan(0)
    expect(through(b.port)).toEqual([])
    await d.stop()
    proxy.seen.length = 0

    const d2 = await startDaemon({ upstreamProxy: ['b.test=direct'] }, { HTTP_PROXY: proxy.url })
    const cacheMiss = randomBytes(50_000)
    const missB = b.addBlob('team/app', cacheMiss)
    await pull(d2, 'b.test', missB)
    expect(through(b.port)).toEqual([])
    const missA = a.addBlob('team/app', randomBytes(50_000))
    await pull(d2, 'a.test', missA)
    expect(through(a.port).length).toBeGreaterThan(0)
  })

  it('refuses a malformed proxy without echoing it', () => {
    const bad = (): unknown => buildConfig({ upstream: [`a.test=${a.url}`], upstreamProxy: ['a.test=ftp://user:s3cret@proxy'] }, {})
    expect(bad).toThrow(ConfigError)
    try { bad() } catch (e) { expect((e as Error).message).not.toContain('s3cret') }
    expect(() => buildConfig({ upstream: [`a.test=${a.url}`] }, { HTTPS_PROXY: 'not a url' })).toThrow(/HTTPS_PROXY/)
    expect(() => buildConfig({ upstream: [`a.test=${a.url}`], upstreamProxy: [`nope.test=${proxy.url}`] }, {})).toThrow(/upstream-proxy/)
  })
})
