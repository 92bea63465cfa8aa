// Small network helpers for tests: free ports, listening, socket tracking and a plain HTTP client
// that keeps no connection pool (so nothing is left open after a test).
import { request as httpRequest, type IncomingHttpHeaders, type Server } from 'node:http'
import { createServer as createNetServer, type AddressInfo, type Socket } from 'node:net'

/** Asks the kernel for a free TCP port on `host` (default 127.0.0.1). Racy by nature; fine for tests. */
export async function getFreePort (host = '127.0.0.1'): Promise<number> {
  const srv = createNetServer()
  await new Promise<void>((resolve, reject) => {
    srv.once('error', reject)
    srv.listen(0, host, () => { resolve() })
  })
  const port = (srv.address() as AddressInfo).port
  await new Promise<void>(resolve => srv.close(() => { resolve() }))
  return port
}

/** Listens on `host:port` (port 0 = ephemeral) and resolves to the bound port. */
export async function listen (server: Server, host = '127.0.0.1', port = 0): Promise<number> {
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject)
    server.listen(port, host, () => { server.off('error', reject); resolve() })
  })
  return (server.address() as AddressInfo).port
}

/**
 * Tracks a server's sockets. `closeServer()` stops listening, destroys every socket (idle,
 * active or hung) and resolves once the server is closed.
 */
export function trackSockets (server: Server): { sockets: Set<Socket>, closeServer: () => Promise<void> } {
  const sockets = new Set<Socket>()
  server.on('connection', (s: Socket) => {
    sockets.add(s)
    s.once('close', () => sockets.delete(s))
  })
  let closed: Promise<void> | undefined
  const closeServer = async (): Promise<void> => {
    closed ??= new Promise<void>(resolve => {
      server.close(() => { resolve() })
      server.closeAllConnections()
      for (const s of sockets) s.destroy()
    })
    await closed
  }
  return { sockets, closeServer }
}

export interface SimpleResponse { status: number, headers: IncomingHttpHeaders, body: Buffer }

/**
 * One HTTP/1.1 request with `Connection: close` and no agent: nothing stays open afterwards.
 * Only for 127.0.0.1 test servers.
 */
export async function simpleRequest (url: string | URL, opts: { method?: string, headers?: Record<string, string>, body?: Buffer | string, timeoutMs?: number } = {}): Promise<SimpleResponse> {
  const u = new URL(url)
  return await new Promise<SimpleResponse>((resolve, reject) => {
    const body = opts.body === undefined ? undefined : Buffer.from(opts.body)
    const req = httpRequest({
      host: u.hostname,
      port: u.port,
      path: u.pathname + u.search,
      method: opts.method ?? 'GET',
      agent: false,
      headers: { connection: 'close', ...(body !== undefined ? { 'content-length': String(body.length) } : {}), ...opts.headers },
      timeout: opts.timeoutMs ?? 10_000,
    }, res => {
      const chunks: Buffer[] = []
      res.on('data', (c: Buffer) => chunks.push(c))
      res.on('end', () => { resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks) }) })
      res.on('error', reject)
    })
    req.on('timeout', () => { req.destroy(new Error(`request to ${u.pathname} timed out`)) })
    req.on('error', reject)
    req.end(body)
  })
}

/** Reads a whole stream into a Buffer (rejects with the stream's error). */
export async function readAll (stream: AsyncIterable<Uint8Array>): Promise<Buffer> {
  const chunks: Buffer[] = []
  for await (const c of stream) chunks.push(Buffer.isBuffer(c) ? c : Buffer.from(c))
  return Buffer.concat(chunks)
}
