// The first request a Node.js process makes with undici costs far more than later ones: its code is
// loaded and compiled on first use, and llhttp's WebAssembly is compiled on the first connection. In a
// fresh daemon that was on the first cold fill's path: 25–35 ms from sending the upstream request to its
// headers, against 6–9 ms in a process that had fetched before (test/bench, loaded 2-core host; a bare
// script: ~19 ms for its first request, ~1 ms from the third). So before the daemon reports ready, it
// sends a few requests the same way (an Agent with the redirect interceptor) to its own HTTP server.
import { Agent, interceptors } from 'undici'

/**
 * Sends `count` GETs of /healthz to our own server listening on `host`:`port` (a wildcard address is
 * reached on loopback; `tls` when it serves HTTPS), reading each body as a fill reads a blob's. Never throws.
 */
export async function warmUpHttpClient (host: string, port: number, o: { tls?: boolean, count?: number, timeoutMs?: number } = {}): Promise<void> {
  const h = host === '0.0.0.0' ? '127.0.0.1' : host === '::' ? '[::1]' : host.includes(':') ? `[${host}]` : host
  // Our own server, on loopback: its certificate (if any) need not verify, and nothing secret is sent.
  const agent = new Agent(o.tls === true ? { connect: { rejectUnauthorized: false } } : {})
  const dispatcher = agent.compose(interceptors.redirect({ maxRedirections: 1 }))
  const signal = AbortSignal.timeout(o.timeoutMs ?? 2000)
  try {
    for (let i = 0; i < (o.count ?? 3); i++) {
      const res = await dispatcher.request({ origin: `${o.tls === true ? 'https' : 'http'}://${h}:${port}`, path: '/healthz', method: 'GET', signal })
      await new Promise<void>((resolve, reject) => {
        res.body.on('data', () => {})
        res.body.once('end', resolve)
        res.body.once('error', reject)
      })
    }
  } catch { /* a warm-up only: the daemon works without it */ } finally {
    await agent.destroy().catch(() => {})
  }
}
