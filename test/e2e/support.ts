// Shared pieces of the e2e suite: naming the upstream for skopeo, log
// barriers, parsing the distribution registry's access log, a throttling TCP
// proxy to make an upstream slow, and a walk of the daemon's data dir.
// (The registry itself comes from ../helpers/registry.ts.)
import { createHash, randomUUID } from 'node:crypto'
import { createReadStream } from 'node:fs'
import { readdir, stat } from 'node:fs/promises'
import { connect, createServer, type Server, type Socket } from 'node:net'
import { join } from 'node:path'
import { pipeline } from 'node:stream/promises'
import { waitFor } from '../helpers/exec.js'

/**
 * The name skopeo uses for an upstream in a mirror path. A docker reference
 * cannot hold `host:port` as a path component (skopeo: "invalid reference
 * format"), so `docker://MIRROR/127.0.0.1:5001/library/test:1` is impossible;
 * the daemon gets the same upstream a second time under a dotted alias,
 * `docker://MIRROR/up5001.test/library/test:1`. containerd keeps using the
 * real `127.0.0.1:PORT` name (it sends it as `?ns=`).
 */
export function upstreamAlias (port: number): string {
  return `up${port}.test`
}

/**
 * Log barrier: servers write their access log after the response, and the
 * lines reach us through a pipe, so a log read right after a client exits can
 * miss the last requests. Send `GET /v2/?pm-barrier=<id>` and wait until a log
 * line carries the id; everything answered before it is then in `logs()`.
 * Returns the length of `logs()` at that point (lines, or characters when the
 * logs are one string): a mark for `logs().slice(mark)`.
 */
export async function logBarrier (server: { url: string, logs: () => string[] | string }, timeoutMs = 5000): Promise<number> {
  const id = randomUUID()
  const res = await fetch(`${server.url}/v2/?pm-barrier=${id}`)
  await res.arrayBuffer()
  return await waitFor(() => {
    const logs = server.logs()
    const seen = typeof logs === 'string' ? logs.includes(id) : logs.some(l => l.includes(id))
    return seen ? logs.length : undefined
  }, { timeoutMs, intervalMs: 10, what: `log barrier ${id} at ${server.url}` })
}

// ------------------------------------------------------------ access logs

export interface AccessEntry { method: string, path: string, status: number, userAgent: string }

/**
 * Requests seen by the distribution registry, from its combined-format access
 * log lines (`"GET /v2/... HTTP/1.1" 200 ...`) or, failing that, from its JSON
 * "response completed" lines. Accepts the output as lines or one string.
 */
export function parseRegistryAccess (logs: string[] | string): AccessEntry[] {
  const lines = typeof logs === 'string' ? logs.split('\n') : logs.flatMap(l => l.split('\n'))
  const combined: AccessEntry[] = []
  const json: AccessEntry[] = []
  const re = /"(GET|HEAD|PUT|POST|PATCH|DELETE) (\S+) HTTP\/[\d.]+" (\d{3}) \S+ "[^"]*" "([^"]*)"/
  for (const l of lines) {
    const m = re.exec(l)
    if (m !== null) { combined.push({ method: m[1] ?? '', path: m[2] ?? '', status: Number(m[3]), userAgent: m[4] ?? '' }); continue }
    if (l.startsWith('{') && l.includes('response completed')) {
      try {
        const r = JSON.parse(l) as Record<string, unknown>
        const method = r['http.request.method']
        const uri = r['http.request.uri']
        const status = r['http.response.status']
        const ua = r['http.request.useragent']
        if (typeof method === 'string' && typeof uri === 'string') {
          json.push({ method, path: uri, status: Number(status), userAgent: typeof ua === 'string' ? ua : '' })
        }
      } catch {}
    }
  }
  return combined.length > 0 ? combined : json
}

/** Blob GETs per digest in an access list. */
export function blobGets (entries: AccessEntry[], method = 'GET'): Map<string, number> {
  const out = new Map<string, number>()
  for (const e of entries) {
    if (e.method !== method) continue
    const m = /\/blobs\/(sha256:[0-9a-f]{64})/.exec(e.path)
    if (m?.[1] !== undefined) out.set(m[1], (out.get(m[1]) ?? 0) + 1)
  }
  return out
}

// ------------------------------------------------------------ slow upstream

export interface Throttle {
  host: string
  port: number
  url: string
  close: () => Promise<void>
}

/**
 * A TCP proxy to `target` that forwards the server's responses at about
 * `bytesPerSec` per connection (requests pass unthrottled). Used to make a
 * fill slow enough to SIGKILL the daemon in the middle of it.
 */
export async function startThrottleProxy (target: { host: string, port: number }, bytesPerSec: number): Promise<Throttle> {
  const sockets = new Set<Socket>()
  const server: Server = createServer(client => {
    const up = connect(target.port, target.host)
    sockets.add(client); sockets.add(up)
    const destroyBoth = (): void => { client.destroy(); up.destroy(); sockets.delete(client); sockets.delete(up) }
    client.on('error', destroyBoth); up.on('error', destroyBoth)
    client.on('close', destroyBoth); up.on('close', destroyBoth)
    client.on('data', b => { if (!up.write(b)) { client.pause(); up.once('drain', () => client.resume()) } })
    // 64 KiB slices, each followed by the delay that keeps the rate.
    const slice = 64 * 1024
    let queue: Buffer[] = []
    let busy = false
    const pump = async (): Promise<void> => {
      if (busy) return
      busy = true
      while (queue.length > 0 && !client.destroyed) {
        const b = queue.shift() as Buffer
        for (let off = 0; off < b.length && !client.destroyed; off += slice) {
          const part = b.subarray(off, off + slice)
          client.write(part)
          await new Promise(r => setTimeout(r, Math.max(1, (part.length / bytesPerSec) * 1000)))
        }
      }
      busy = false
      if (queue.length === 0) up.resume()
    }
    up.on('data', b => { queue.push(b); up.pause(); void pump() })
  })
  await new Promise<void>(resolve => server.listen(0, '127.0.0.1', resolve))
  const addr = server.address()
  if (addr === null || typeof addr === 'string') throw new Error('throttle proxy has no port')
  return {
    host: `127.0.0.1:${addr.port}`,
    port: addr.port,
    url: `http://127.0.0.1:${addr.port}`,
    close: async () => {
      for (const s of sockets) s.destroy()
      await new Promise<void>(resolve => server.close(() => resolve()))
    },
  }
}

// ------------------------------------------------------------ data dir walk

async function sha256File (path: string): Promise<string> {
  const h = createHash('sha256')
  await pipeline(createReadStream(path, { highWaterMark: 1 << 20 }), h)
  return h.digest('hex')
}

async function walk (dir: string): Promise<string[]> {
  let ents
  try { ents = await readdir(dir, { withFileTypes: true }) } catch { return [] }
  const out: string[] = []
  for (const e of ents) {
    const p = join(dir, e.name)
    if (e.isDirectory()) out.push(...await walk(p))
    else out.push(p)
  }
  return out
}

/**
 * Check the daemon's store: every file under `blobs/<alg>/<xx>/<hex>` hashes
 * to its name and sits in the right fan-out directory. Returns the digests.
 */
export async function verifyDataDirBlobs (dataDir: string): Promise<string[]> {
  const root = join(dataDir, 'blobs')
  const bad: string[] = []
  const digests: string[] = []
  for (const f of await walk(root)) {
    const rel = f.slice(root.length + 1).split('/')
    const [alg, fan, hex] = rel
    if (rel.length !== 3 || alg !== 'sha256' || hex === undefined || fan !== hex.slice(0, 2) || !/^[0-9a-f]{64}$/.test(hex)) {
      bad.push(`unexpected file in blobs/: ${f}`)
      continue
    }
    const got = await sha256File(f)
    if (got !== hex) bad.push(`${f} hashes to sha256:${got}`)
    else digests.push(`sha256:${hex}`)
  }
  if (bad.length > 0) throw new Error(`data dir ${dataDir} is corrupt:\n  ${bad.join('\n  ')}`)
  return digests
}

/** Regular files left under `<dataDir>/tmp`. */
export async function tmpFiles (dataDir: string): Promise<string[]> {
  try { await stat(join(dataDir, 'tmp')) } catch { return [] }
  return await walk(join(dataDir, 'tmp'))
}
