// The first request a Node.js process makes with undici costs far more than later ones: its code is
// loaded and compiled on first use, and llhttp's WebAssembly is compiled on the first connection. In a
// fresh daemon that was on the first cold fill's path: 25–35 ms from sending the upstream request to its
// headers, against 6–9 ms in a process that had fetched before (test/bench, loaded 2-core host; a bare
// script: ~19 ms for its first request, ~1 ms from the third). So while the daemon starts, it sends a
// few requests the way the upstream client does (an Agent with the redirect interceptor, the body read
// with 'data' events) to a throwaway server of its own on loopback: no log line, no metric, no traffic.
import { createServer } from 'node:http'
import type { AddressInfo } from 'node:net'
import { Agent, interceptors } from 'undici'

const BODY = Buffer.alloc(64 * 1024)

/** Runs undici's request path `count` times against a loopback server it starts and stops. Never throws. */
export async function warmUpHttpClient (o: { count?: number, timeoutMs?: number } = {}): Promise<void> {
  const server = createServer((_req, res) => { res.setHeader('content-length', BODY.length); res.end(BODY) })
  const agent = new Agent()
  const dispatcher = agent.compose(interceptors.redirect({ maxRedirections: 1 }))
  const signal = AbortSignal.timeout(o.timeoutMs ?? 2000)
  try {
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject)
      server.listen(0, '127.0.0.1', () => { server.off('error', reject); resolve() })
    })
    const origin = `http://127.0.0.1:${(server.address() as AddressInfo).port}`
    for (let i = 0; i < (o.count ?? 3); i++) {
      const res = await dispatcher.request({ origin, path: '/v2/warm-up/blobs/x', method: 'GET', signal })
      await new Promise<void>((resolve, reject) => {
        res.body.on('data', () => {})
        res.body.once('end', resolve)
        res.body.once('error', reject)
      })
    }
  } catch { /* a warm-up only: the daemon works without it */ } finally {
    await agent.destroy().catch(() => {})
    server.closeAllConnections()
    await new Promise<void>(resolve => server.close(() => resolve()))
  }
}
