import type { Command } from 'commander'
import { request } from 'undici'
import type { CliIo } from './index.js'
import { formatBytes } from './status.js'
import { ADMIN_HEADER } from '../http/admin-routes.js'

/** Calls the running daemon's admin API; resolves with the JSON body, or reports and sets exit 1. */
async function call (io: CliIo, url: string, method: 'GET' | 'POST' | 'DELETE', path: string, body?: unknown): Promise<Record<string, unknown> | undefined> {
  try {
    const res = await request(new URL(path, url), {
      method,
      // The admin header: the daemon refuses state-changing requests without it (or a JSON body).
      headers: { [ADMIN_HEADER]: '1', ...(body !== undefined ? { 'content-type': 'application/json' } : {}) },
      ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
      headersTimeout: 30 * 60_000,
      bodyTimeout: 30 * 60_000,
    })
    const json = await res.body.json().catch(() => ({})) as Record<string, unknown>
    if (res.statusCode >= 400) {
      const e = (json.errors as Array<{ code?: string, message?: string, detail?: unknown }> | undefined)?.[0]
      io.stderr.write(`pullmesh: ${e?.code ?? res.statusCode}: ${e?.message ?? 'request failed'}${e?.detail !== undefined ? ` ${JSON.stringify(e.detail)}` : ''}\n`)
      return undefined
    }
    return json
  } catch (err) {
    io.stderr.write(`pullmesh: cannot reach the daemon at ${url}: ${(err as Error).message}\n`)
    return undefined
  }
}

export function registerAdmin (program: Command, io: CliIo, setExit: (code: number) => void): void {
  const defaultUrl = io.env.PULLMESH_URL ?? 'http://127.0.0.1:5000'
  const out = (json: boolean | undefined, value: unknown, text: string): void => {
    io.stdout.write(json === true ? `${JSON.stringify(value, null, 2)}\n` : `${text}\n`)
  }

  program.command('pin')
    .description('pull an image (if needed) and keep all of it in the cache: pinned content is never evicted')
    .argument('<image>', 'e.g. nginx:1.25 or ghcr.io/org/img:tag')
    .option('--url <url>', 'the daemon', defaultUrl)
    .option('--json', 'print JSON')
    .action(async (image: string, o: { url: string, json?: boolean }) => {
      const r = await call(io, o.url, 'POST', '/pullmesh/v1/pins', { image })
      if (r === undefined) { setExit(1); return }
      out(o.json, r, `pinned ${String(r.pinned)}: ${String(r.manifests)} manifests, ${String(r.blobs)} blobs, ${formatBytes(Number(r.bytes))}`)
    })

  program.command('unpin')
    .description('let a pinned image be evicted again')
    .argument('<image>')
    .option('--url <url>', 'the daemon', defaultUrl)
    .action(async (image: string, o: { url: string }) => {
      const r = await call(io, o.url, 'DELETE', `/pullmesh/v1/pins?image=${encodeURIComponent(image)}`)
      if (r === undefined) { setExit(1); return }
      io.stdout.write(`unpinned ${String(r.unpinned)}\n`)
    })

  program.command('gc')
    .description('evict now what the disk budget and --max-age call for, and drop tags whose content is gone')
    .option('--url <url>', 'the daemon', defaultUrl)
    .option('--json', 'print JSON')
    .action(async (o: { url: string, json?: boolean }) => {
      const r = await call(io, o.url, 'POST', '/pullmesh/v1/gc')
      if (r === undefined) { setExit(1); return }
      const store = r.store as { bytes: number, blobs: number }
      out(o.json, r, `evicted ${String(r.evicted)} blobs (${formatBytes(Number(r.bytes))}), dropped ${String(r.tagsDropped)} tags; cache now ${formatBytes(store.bytes)} in ${store.blobs} blobs`)
    })

  program.command('evict')
    .description('remove an image (as cached here) or one digest from the cache; pinned and in-use content is kept')
    .argument('<image-or-digest>')
    .option('--url <url>', 'the daemon', defaultUrl)
    .option('--json', 'print JSON')
    .action(async (target: string, o: { url: string, json?: boolean }) => {
      const r = await call(io, o.url, 'POST', '/pullmesh/v1/evict', { target })
      if (r === undefined) { setExit(1); return }
      const evicted = r.evicted as string[]
      const skipped = r.skipped as Array<{ digest: string, reason: string }>
      out(o.json, r, [`evicted ${evicted.length} items`, ...skipped.map(s => `kept ${s.digest}: ${s.reason}`)].join('\n'))
    })
}
