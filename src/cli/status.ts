import type { Command } from 'commander'
import { request } from 'undici'
import type { CliIo } from './index.js'
import type { NodeStatus } from '../http/status-routes.js'

export function registerStatus (program: Command, io: CliIo, setExit: (code: number) => void): void {
  program.command('status')
    .description("show the running daemon's health, cache and peers")
    .option('--url <url>', 'the daemon to ask', io.env.PULLMESH_URL ?? 'http://127.0.0.1:5000')
    .option('--json', 'print JSON')
    .action(async (opts: { url: string, json?: boolean }) => {
      let s: NodeStatus
      try {
        const res = await request(new URL('/pullmesh/v1/status', opts.url), { headersTimeout: 5_000, bodyTimeout: 5_000 })
        if (res.statusCode !== 200) {
          await res.body.dump()
          throw new Error(`the daemon answered ${res.statusCode}`)
        }
        s = await res.body.json() as NodeStatus
      } catch (err) {
        io.stderr.write(`pullmesh status: cannot reach the daemon at ${opts.url}: ${(err as Error).message}\n`)
        setExit(1)
        return
      }
      io.stdout.write(opts.json === true ? `${JSON.stringify(s, null, 2)}\n` : formatStatus(s))
    })
}

export function formatBytes (n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB']
  let v = n
  let i = 0
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++ }
  return `${i === 0 ? v : v.toFixed(1)} ${units[i]}`
}

export function formatStatus (s: NodeStatus): string {
  const lines: string[] = []
  const c = s.cache
  lines.push(`pullmesh ${s.version} at ${s.url}: ${s.status}, up ${s.uptimeSeconds}s`)
  lines.push(`data:      ${s.dataDir}`)
  lines.push(`upstreams: ${s.upstreams.join(', ')}`)
  lines.push(`cache:     ${formatBytes(c.bytes)}${c.maxBytes !== undefined ? ` of ${formatBytes(c.maxBytes)} (${Math.round(100 * c.bytes / c.maxBytes)}%)` : ''} in ${c.blobs} blobs`)
  lines.push(`hit ratio: ${c.hitRatio === null ? 'n/a' : `${(100 * c.hitRatio).toFixed(1)}%`} (${c.hits} hits, ${c.misses} misses)`)
  if (!s.mesh.enabled) {
    lines.push('mesh:      off')
  } else {
    lines.push(`mesh:      ${s.mesh.peerId}${s.mesh.peerUrl !== undefined ? `, data path ${s.mesh.peerUrl}` : ''}`)
    lines.push(`peers:     ${s.mesh.peers.length}`)
    for (const p of s.mesh.peers) {
      lines.push(`  ${p.connected ? '●' : '○'} ${p.peerId}  ${p.dataUrl ?? p.addrs[0] ?? '?'}  ${p.blobs} blobs, ${formatBytes(p.bytes)}, score ${p.score.toFixed(1)}`)
    }
  }
  return `${lines.join('\n')}\n`
}
