// Several "hosts" on one machine, for mesh tests with mDNS: Linux network namespaces on a bridge
// (recipe in ../shared/NOTES.md). Needs root and `ip`.
//
//   hub namespace  pm<pid>h : br0 (mcast_snooping 0), 10.99.S.1/24 — the upstream registry runs here
//   node namespace pm<pid>n<i>: eth0 (veth to br0), 10.99.S.(10+i)/24, multicast on,
//                               route 224.0.0.0/4 dev eth0, no default route
//
// With `segments: K` (K > 1) the hub is also a router between K LAN segments: segment k has its own
// bridge (br0 for k = 0, sg<k> otherwise) and subnet 10.(99-k).S.0/24, the hub holds 10.(99-k).S.1 on
// it and forwards IPv4 between them; each node routes the other segments' subnets via its segment's
// hub address. Multicast is never routed, so mDNS stays inside a segment, as on a real routed network.
//
// Names carry our PID, so parallel or leftover runs never collide. `teardown()` kills every process
// this lab started (by PID), then deletes every namespace it created; it also runs on process exit.
// Nothing here touches the root network namespace: mDNS and multicast only ever run in the nodes.
//
// The test process itself stays in the root namespace and cannot reach 10.99.S.0/24: it talks to
// the namespaces through commands run with `ip netns exec` (curl, skopeo, ctr) and through files.
import { execFileSync, spawn, type ChildProcess } from 'node:child_process'
import { createRequire } from 'node:module'
import { randomBytes } from 'node:crypto'
import { mkdir, mkdtemp, readdir, readlink, rm, stat, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { run, waitFor, type RunOptions, type RunResult } from './exec.js'
import { verifyContentDir, writeContainerdConfig } from './containerd.js'
import { registryConfigYaml, type RegistryProcess } from './registry.js'

export interface NetnsNode {
  /** Namespace name. */
  ns: string
  /** 1-based. */
  index: number
  /** 10.(99-segment).S.(10+index) */
  ip: string
  /** The LAN segment (0-based; always 0 in a one-segment lab). */
  segment: number
}

export interface NetnsProcess {
  pid: number
  child: ChildProcess
  logs: () => string
  exited: () => boolean
  /** SIGTERM (SIGKILL after `graceMs`), by PID; resolves once it has exited. Safe to call twice. */
  stop: (graceMs?: number) => Promise<void>
}

export interface NetnsLab {
  hub: string
  /** The third octet: the subnet is 10.99.S.0/24. */
  subnet: number
  /** The hub's br0 address, where the upstream registry listens. */
  hubIp: string
  /** The hub's address on each segment's bridge, the nodes' gateway there (gateways[0] is hubIp). */
  gateways: string[]
  nodes: NetnsNode[]
  /** Adds one more node namespace to a segment's bridge (default segment 0). */
  addNode: (segment?: number) => Promise<NetnsNode>
  /** `ip netns exec ns cmd args` to completion (see run()). */
  exec: (ns: string, cmd: string, args: readonly string[], o?: RunOptions) => Promise<RunResult>
  /** Starts a long-running `ip netns exec ns cmd args`; tracked, and killed by PID at teardown. */
  spawn: (ns: string, cmd: string, args: readonly string[], o?: { cwd?: string, env?: NodeJS.ProcessEnv }) => NetnsProcess
  /** Tracks a process started elsewhere (e.g. by startDaemon) so that teardown kills it by PID. */
  track: (pid: number) => void
  /** GET `url` with curl inside `ns`. Throws on a transport error; any HTTP status is returned. */
  httpGet: (ns: string, url: string, o?: { timeoutMs?: number }) => Promise<{ status: number, body: string }>
  /** Idempotent: kill tracked processes by PID, delete every namespace created. */
  teardown: () => Promise<void>
  /** Pulls a node's cable: its veth port on the hub goes down (the node keeps its address and routes, with no carrier). */
  cutLink: (node: NetnsNode) => Promise<void>
  /** Plugs the cable back in. */
  restoreLink: (node: NetnsNode) => Promise<void>
  /**
   * Splits the LAN: the given nodes' ports move to a second bridge in the hub (br1, no address), so
   * they reach each other but neither the other nodes nor the hub (the upstream). Idempotent.
   */
  splitBridge: (side: readonly NetnsNode[]) => Promise<void>
  /** Moves every node's port back to br0. */
  healBridge: () => Promise<void>
}

/** `net:[4026531840]` for a PID (or 'self'). */
export async function netnsOf (pid: number | 'self'): Promise<string> {
  return await readlink(`/proc/${pid}/ns/net`)
}

/** The nsfs inode behind a named namespace (`/run/netns/NAME`), as `net:[INODE]` to compare with netnsOf(). */
export async function namedNetns (name: string): Promise<string> {
  const s = await stat(join('/run/netns', name))
  return `net:[${s.ino}]`
}

function ipSync (args: string[]): void {
  execFileSync('ip', args, { stdio: ['ignore', 'ignore', 'pipe'], timeout: 10_000 })
}

function alive (pid: number): boolean {
  try { process.kill(pid, 0); return true } catch { return false }
}

/** `nodes` nodes on segment 0; `segments` LAN segments routed through the hub (default 1). */
export async function createNetnsLab (o: { nodes: number, segments?: number }): Promise<NetnsLab> {
  if (typeof process.getuid === 'function' && process.getuid() !== 0) throw new Error('network namespaces need root')
  const tag = `pm${process.pid}${randomBytes(2).toString('hex')}`
  const hub = `${tag}h`
  const subnet = 20 + (process.pid % 200)
  const segments = o.segments ?? 1
  if (!Number.isInteger(segments) || segments < 1 || segments > 9) throw new Error(`segments: expected 1 to 9, got ${segments}`)
  const prefix = (segment: number): string => `10.${99 - segment}.${subnet}`
  const bridgeOf = (segment: number): string => segment === 0 ? 'br0' : `sg${segment}`
  const gateways = Array.from({ length: segments }, (_, k) => `${prefix(k)}.1`)
  const hubIp = gateways[0]!
  const created: string[] = []
  const tracked = new Set<number>()
  const procs = new Set<NetnsProcess>()
  const nodes: NetnsNode[] = []
  let tornDown = false

  const ip = async (...args: string[]): Promise<void> => { await run('ip', args, { timeoutMs: 10_000 }) }

  // Last resort if the test process dies without afterAll: synchronous, best effort.
  const onExit = (): void => {
    if (tornDown) return
    for (const pid of tracked) { try { process.kill(pid, 'SIGKILL') } catch {} }
    for (const ns of [...created].reverse()) { try { ipSync(['netns', 'del', ns]) } catch {} }
  }
  process.once('exit', onExit)

  async function addNode (segment = 0): Promise<NetnsNode> {
    if (!Number.isInteger(segment) || segment < 0 || segment >= segments) throw new Error(`segment ${segment}: this lab has segments 0 to ${segments - 1}`)
    const index = nodes.length + 1
    const ns = `${tag}n${index}`
    await ip('netns', 'add', ns)
    created.push(ns)
    await ip('-n', ns, 'link', 'set', 'lo', 'up')
    await ip('-n', hub, 'link', 'add', `veth${index}`, 'type', 'veth', 'peer', 'name', 'eth0', 'netns', ns)
    await ip('-n', hub, 'link', 'set', `veth${index}`, 'master', bridgeOf(segment))
    await ip('-n', hub, 'link', 'set', `veth${index}`, 'up')
    const addr = `${prefix(segment)}.${10 + index}`
    await ip('-n', ns, 'addr', 'add', `${addr}/24`, 'dev', 'eth0')
    await ip('-n', ns, 'link', 'set', 'eth0', 'multicast', 'on', 'up')
    await ip('-n', ns, 'route', 'add', '224.0.0.0/4', 'dev', 'eth0') // no default route, on purpose
    // The other segments (unicast only) through this segment's hub address.
    for (let k = 0; k < segments; k++) if (k !== segment) await ip('-n', ns, 'route', 'add', `${prefix(k)}.0/24`, 'via', gateways[segment]!)
    const node = { ns, index, ip: addr, segment }
    nodes.push(node)
    return node
  }

  const exec = async (ns: string, cmd: string, args: readonly string[], ro?: RunOptions): Promise<RunResult> =>
    await run('ip', ['netns', 'exec', ns, cmd, ...args], ro)

  function spawnIn (ns: string, cmd: string, args: readonly string[], so: { cwd?: string, env?: NodeJS.ProcessEnv } = {}): NetnsProcess {
    const child = spawn('ip', ['netns', 'exec', ns, cmd, ...args], { cwd: so.cwd, env: so.env ?? process.env, stdio: ['ignore', 'pipe', 'pipe'] })
    const pid = child.pid ?? -1
    if (pid > 0) tracked.add(pid)
    const MAX = 16 * 1024 * 1024
    let log = ''
    const append = (b: Buffer): void => { if (log.length < MAX) log += b.toString('utf8') }
    child.stdout?.on('data', append)
    child.stderr?.on('data', append)
    let done = false
    const exitP = new Promise<void>(resolve => {
      child.once('exit', () => { done = true; tracked.delete(pid); resolve() })
      child.once('error', e => { log += `\n[spawn error] ${e.message}\n`; done = true; tracked.delete(pid); resolve() })
    })
    const p: NetnsProcess = {
      pid,
      child,
      logs: () => log,
      exited: () => done,
      async stop (graceMs = 5000) {
        if (!done && pid > 0) {
          try { process.kill(pid, 'SIGTERM') } catch {}
          const t = setTimeout(() => { try { process.kill(pid, 'SIGKILL') } catch {} }, graceMs)
          try { await exitP } finally { clearTimeout(t) }
        }
        procs.delete(p)
      },
    }
    procs.add(p)
    return p
  }

  async function httpGet (ns: string, url: string, ho: { timeoutMs?: number } = {}): Promise<{ status: number, body: string }> {
    const timeoutMs = ho.timeoutMs ?? 5000
    const r = await exec(ns, 'curl', ['-sS', '--max-time', String(timeoutMs / 1000), '-w', '\n%{http_code}', url], { timeoutMs: timeoutMs + 2000 })
    const nl = r.stdout.lastIndexOf('\n')
    return { status: Number(r.stdout.slice(nl + 1)), body: r.stdout.slice(0, nl) }
  }

  async function teardown (): Promise<void> {
    if (tornDown) return
    tornDown = true
    process.off('exit', onExit)
    const errors: string[] = []
    await Promise.all([...procs].map(async p => { await p.stop(3000) }))
    for (const pid of tracked) { try { process.kill(pid, 'SIGKILL') } catch {} }
    await waitFor(() => [...tracked].every(pid => !alive(pid)), { timeoutMs: 5000, what: 'tracked processes to exit' }).catch((e: unknown) => errors.push(String(e)))
    for (const ns of [...created].reverse()) {
      const r = await run('ip', ['netns', 'del', ns], { allowFailure: true, timeoutMs: 10_000 })
      if (r.code !== 0) errors.push(`ip netns del ${ns}: ${r.stderr.trim()}`)
    }
    const left = (await run('ip', ['netns', 'list'], { allowFailure: true })).stdout.split('\n').filter(l => l.startsWith(tag))
    if (left.length > 0) errors.push(`namespaces left over: ${left.join(', ')}`)
    if (errors.length > 0) throw new Error(`netns teardown: ${errors.join('; ')}`)
  }

  // A bridge takes the lowest MAC among its ports unless one is set: moving ports away and back would
  // change br0's MAC under the nodes' ARP caches, and the hub (the upstream) would vanish for a while.
  let macPinned = false
  async function pinBridgeMac (): Promise<void> {
    if (macPinned) return
    const r = await run('ip', ['-j', '-n', hub, 'link', 'show', 'br0'], { timeoutMs: 10_000 })
    const mac = (JSON.parse(r.stdout) as Array<{ address?: string }>)[0]?.address
    if (mac === undefined) throw new Error('no MAC address on br0')
    await ip('-n', hub, 'link', 'set', 'br0', 'address', mac)
    macPinned = true
  }

  async function cutLink (node: NetnsNode): Promise<void> { await pinBridgeMac(); await ip('-n', hub, 'link', 'set', `veth${node.index}`, 'down') }
  async function restoreLink (node: NetnsNode): Promise<void> { await ip('-n', hub, 'link', 'set', `veth${node.index}`, 'up') }

  let br1 = false
  async function splitBridge (side: readonly NetnsNode[]): Promise<void> {
    await pinBridgeMac()
    if (!br1) {
      await ip('-n', hub, 'link', 'add', 'br1', 'type', 'bridge')
      await ip('-n', hub, 'link', 'set', 'br1', 'type', 'bridge', 'mcast_snooping', '0')
      await ip('-n', hub, 'link', 'set', 'br1', 'up')
      br1 = true
    }
    for (const n of side) await ip('-n', hub, 'link', 'set', `veth${n.index}`, 'master', 'br1')
  }
  async function healBridge (): Promise<void> {
    for (const n of nodes) await ip('-n', hub, 'link', 'set', `veth${n.index}`, 'master', bridgeOf(n.segment))
  }

  try {
    await ip('netns', 'add', hub)
    created.push(hub)
    await ip('-n', hub, 'link', 'set', 'lo', 'up')
    for (let k = 0; k < segments; k++) {
      const br = bridgeOf(k)
      await ip('-n', hub, 'link', 'add', br, 'type', 'bridge')
      await ip('-n', hub, 'link', 'set', br, 'type', 'bridge', 'mcast_snooping', '0') // flood multicast; there is no IGMP querier
      await ip('-n', hub, 'addr', 'add', `${gateways[k]}/24`, 'dev', br)
      await ip('-n', hub, 'link', 'set', br, 'up')
    }
    // A router between the segments: unicast IPv4 only (nothing routes multicast here).
    if (segments > 1) await run('ip', ['netns', 'exec', hub, 'sysctl', '-qw', 'net.ipv4.ip_forward=1'], { timeoutMs: 10_000 })
    for (let i = 0; i < o.nodes; i++) await addNode()
  } catch (e) {
    await teardown().catch(() => {})
    throw e
  }

  return {
    hub,
    subnet,
    hubIp,
    gateways,
    nodes,
    addNode,
    exec,
    spawn: spawnIn,
    track: (pid: number) => { if (pid > 0) tracked.add(pid) },
    httpGet,
    teardown,
    cutLink,
    restoreLink,
    splitBridge,
    healBridge,
  }
}

// ------------------------------------------------------------------ registry in the hub

/** The same handle as the loopback registry's. */
export type NetnsRegistry = RegistryProcess

/**
 * The CNCF distribution registry (`docker-registry serve`) inside `ns` (the hub), listening on
 * `ip:port`, with the access log on. Its combined-format access lines start with the client address.
 */
export async function startNetnsRegistry (lab: NetnsLab, o: { ns: string, ip: string, port?: number, parentDir?: string }): Promise<NetnsRegistry> {
  const dir = await mkdtemp(join(o.parentDir ?? tmpdir(), 'pullmesh-nsreg-'))
  await mkdir(join(dir, 'data'))
  const port = o.port ?? 5000
  const config = registryConfigYaml({ root: join(dir, 'data'), addr: `${o.ip}:${port}` })
  const configPath = join(dir, 'config.yml')
  await writeFile(configPath, config)
  const url = `http://${o.ip}:${port}`
  let proc: NetnsProcess | undefined
  let prevLogs = ''
  const env: NodeJS.ProcessEnv = { PATH: process.env.PATH ?? '/usr/bin:/bin', HOME: dir } // REGISTRY_* must not leak in

  async function start (): Promise<void> {
    if (proc !== undefined && !proc.exited()) return
    if (proc !== undefined) prevLogs += proc.logs()
    const p = lab.spawn(o.ns, 'docker-registry', ['serve', configPath], { cwd: dir, env })
    proc = p
    await waitFor(async () => {
      if (p.exited()) throw new Error(`docker-registry exited during startup:\n${p.logs().slice(-4000)}`)
      const r = await lab.httpGet(o.ns, `${url}/v2/`, { timeoutMs: 1000 }).catch(() => undefined)
      return r?.status === 200
    }, { timeoutMs: 15_000, intervalMs: 50, what: `docker-registry at ${url} in ${o.ns}` })
  }
  async function stop (): Promise<void> { await proc?.stop() }

  await start()
  return {
    url,
    host: `${o.ip}:${port}`,
    port,
    dir,
    logs: () => prevLogs + (proc?.logs() ?? ''),
    get running () { return proc !== undefined && !proc.exited() },
    start,
    stop,
    async close () { await stop(); await rm(dir, { recursive: true, force: true }) },
  }
}

export interface RemoteAccess { remote: string, method: string, path: string, status: number, userAgent: string }

/** Combined-format access lines of the distribution registry, with the client address. */
export function parseAccessWithRemote (logs: string): RemoteAccess[] {
  const out: RemoteAccess[] = []
  const re = /^(\S+) - \S+ \[[^\]]*\] "(GET|HEAD|PUT|POST|PATCH|DELETE) (\S+) HTTP\/[\d.]+" (\d{3}) \S+ "[^"]*" "([^"]*)"/
  for (const l of logs.split('\n')) {
    const m = re.exec(l)
    if (m === null) continue
    const remote = (m[1] ?? '').replace(/:\d+$/, '')
    out.push({ remote, method: m[2] ?? '', path: m[3] ?? '', status: Number(m[4]), userAgent: m[5] ?? '' })
  }
  return out
}

// ------------------------------------------------------------------ containerd in a node

export interface NetnsContainerd {
  dir: string
  socket: string
  pid: number
  logs: () => string
  /** `ip netns exec NS ctr -a SOCK ...args` */
  ctr: (args: string[], o?: { allowFailure?: boolean, timeoutMs?: number }) => Promise<RunResult>
  /** Every blob in the content store, each verified by hashing the file against its name. */
  verifyContentStore: () => Promise<string[]>
  stop: () => Promise<void>
}

/** containerd 1.6 inside `ns`, with root, state and sockets in a temp dir, CRI off. ctr runs in `ns` too. */
export async function startNetnsContainerd (lab: NetnsLab, ns: string, parentDir?: string): Promise<NetnsContainerd> {
  const { dir, root, socket, configFile } = await writeContainerdConfig('pullmesh-nsctrd-', parentDir)
  const p = lab.spawn(ns, 'containerd', ['--config', configFile, '--log-level', 'warn'])
  const ctr = async (args: string[], co: { allowFailure?: boolean, timeoutMs?: number } = {}): Promise<RunResult> =>
    await lab.exec(ns, 'ctr', ['-a', socket, ...args], { allowFailure: co.allowFailure, timeoutMs: co.timeoutMs ?? 180_000 })
  // ip netns exec gives containerd its own (slave) mount namespace: its mounts die with it.
  const cleanup = async (): Promise<void> => { await p.stop(); await rm(dir, { recursive: true, force: true }) }
  try {
    await waitFor(async () => {
      if (p.exited()) throw new Error(`containerd exited early:\n${p.logs()}`)
      await stat(socket)
      return (await ctr(['version'], { allowFailure: true, timeoutMs: 5000 })).code === 0
    }, { timeoutMs: 20_000, what: `containerd in ${ns}` })
  } catch (e) {
    await cleanup()
    throw new Error(`containerd did not start in ${ns}: ${String(e)}\n${p.logs()}`)
  }
  const contentDir = join(root, 'io.containerd.content.v1.content', 'blobs', 'sha256')
  return {
    dir,
    socket,
    pid: p.pid,
    logs: p.logs,
    ctr,
    verifyContentStore: async () => await verifyContentDir(contentDir),
    stop: cleanup,
  }
}

// ------------------------------------------------------------------ plain HTTP file server

/**
 * A tiny node HTTP server inside `ns` serving one file at `/file` (1 MiB read chunks, like the
 * daemon's store reads): the baseline for peer-to-peer throughput. Resolves once it answers.
 */
export async function startFileServer (lab: NetnsLab, node: NetnsNode, file: string, port = 8080): Promise<{ url: string, stop: () => Promise<void> }> {
  const script = `
    const http = require('node:http'); const fs = require('node:fs')
    const file = process.argv[1]
    http.createServer((req, res) => {
      if (req.url !== '/file') { res.writeHead(404); res.end(); return }
      const size = fs.statSync(file).size
      res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': size })
      if (req.method === 'HEAD') { res.end(); return }
      fs.createReadStream(file, { highWaterMark: 1 << 20 }).pipe(res)
    }).listen(${port}, '0.0.0.0', () => console.log('ready'))`
  const p = lab.spawn(node.ns, process.execPath, ['-e', script, file])
  const url = `http://${node.ip}:${port}/file`
  await waitFor(async () => {
    if (p.exited()) throw new Error(`file server exited:\n${p.logs()}`)
    return p.logs().includes('ready')
  }, { timeoutMs: 10_000, what: 'file server' })
  return { url, stop: async () => { await p.stop() } }
}


// ------------------------------------------------------------------ mDNS listener

export interface MdnsPacket {
  /** ms since epoch, when it arrived. */
  at: number
  /** Source address. */
  from: string
  kind: 'query' | 'response'
  /** UDP payload size. */
  bytes: number
  /** Question names (queries) or answer names (responses). */
  names: string[]
  /** Peer ids in the answers' `dnsaddr=/…/p2p/<id>` TXT records (libp2p mDNS responses). */
  peerIds: string[]
}

/**
 * A passive mDNS listener inside `ns`: a UDP socket on 5353 (shared with any mDNS responder there,
 * SO_REUSEADDR) in the group 224.0.0.251, decoding each packet with dns-packet. It only listens, so
 * it sees what every host on that namespace's LAN segment receives, its own namespace's packets too.
 */
export async function startMdnsListener (lab: NetnsLab, ns: string): Promise<{ packets: () => MdnsPacket[], stop: () => Promise<void> }> {
  const dnsPacket = createRequire(import.meta.url).resolve('dns-packet')
  const script = `
    const dgram = require('node:dgram'); const packet = require(process.argv[1])
    const s = dgram.createSocket({ type: 'udp4', reuseAddr: true })
    s.on('message', (buf, rinfo) => {
      let p; try { p = packet.decode(buf) } catch { return }
      const answers = [...(p.answers || []), ...(p.additionals || [])]
      const txt = answers.filter(a => a.type === 'TXT').flatMap(a => [].concat(a.data).map(String))
      const peerIds = [...new Set(txt.filter(t => t.includes('/p2p/')).map(t => t.split('/p2p/').pop().split('/')[0]))]
      const names = p.type === 'query' ? (p.questions || []).map(q => q.name) : (p.answers || []).map(a => a.name)
      console.log(JSON.stringify({ at: Date.now(), from: rinfo.address, kind: p.type, bytes: rinfo.size, names, peerIds }))
    })
    s.bind(5353, () => { s.addMembership('224.0.0.251'); console.log('listening') })`
  const p = lab.spawn(ns, process.execPath, ['-e', script, dnsPacket])
  await waitFor(async () => {
    if (p.exited()) throw new Error(`mDNS listener exited:\n${p.logs()}`)
    return p.logs().includes('listening')
  }, { timeoutMs: 10_000, what: `mDNS listener in ${ns}` })
  return {
    packets: () => p.logs().split('\n').filter(l => l.startsWith('{')).map(l => JSON.parse(l) as MdnsPacket),
    stop: async () => { await p.stop() },
  }
}
