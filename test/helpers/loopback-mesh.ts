// In-process daemons on loopback that form a mesh through bootstrap addresses (mDNS off), each with
// its own temp data dir, all in front of one upstream. A test file makes one with `loopbackMesh`, calls
// `node()` as often as it needs, `stopNodes()` after each test and `close()` at the end.
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { buildConfig, type RawSettings } from '../../src/config.js'
import { createDaemon, type Daemon } from '../../src/daemon.js'
import { createLogger } from '../../src/logger.js'

/** A parsed log line, as a test sees it. */
export interface LogLine { level: number, msg: string, remote?: string, reason?: string, [k: string]: unknown }

export interface NodeSettings extends RawSettings {
  /** Bootstrap from these nodes' first multiaddr. */
  bootstrapFrom?: Daemon[]
  /** Collect the node's warnings and errors here (default: silent). */
  logs?: LogLine[]
}

export interface LoopbackMesh {
  /** Starts a daemon: defaults, then the mesh's own settings, then these. */
  node: (settings?: NodeSettings) => Promise<Daemon>
  /** A temp dir removed by `close()`. */
  tempDir: () => Promise<string>
  /** Stops every node started so far, newest first. */
  stopNodes: () => Promise<void>
  /** Stops the nodes and removes the temp dirs. */
  close: () => Promise<void>
}

export interface LoopbackMeshInit {
  /** The upstream's name, and its URL (read when a node starts: the upstream may start later than this). */
  upstreamName: string
  upstreamUrl: () => string
  /** Prefix of the temp dirs (names the test file in leftovers). */
  dirPrefix: string
  /** Settings every node of this mesh gets, before the node's own. */
  settings?: RawSettings
}

export function loopbackMesh (init: LoopbackMeshInit): LoopbackMesh {
  const dirs: string[] = []
  const nodes: Daemon[] = []
  const tempDir = async (): Promise<string> => {
    const d = await mkdtemp(join(tmpdir(), init.dirPrefix))
    dirs.push(d)
    return d
  }
  const stopNodes = async (): Promise<void> => {
    await Promise.allSettled(nodes.splice(0).reverse().map(async n => await n.stop()))
  }
  return {
    tempDir,
    stopNodes,
    async node (settings = {}) {
      const { bootstrapFrom, logs, ...rest } = settings
      const config = buildConfig({
        listen: '127.0.0.1:0',
        dataDir: await tempDir(),
        upstream: [`${init.upstreamName}=${init.upstreamUrl()}`],
        mdns: false,
        p2pListen: ['/ip4/127.0.0.1/tcp/0'],
        peerListen: '127.0.0.1:0',
        bootstrap: (bootstrapFrom ?? []).flatMap(n => n.mesh()!.multiaddrs().slice(0, 1)),
        upstreamRetries: '1',
        ...init.settings,
        ...rest,
      }, {})
      const logger = logs !== undefined
        ? createLogger('warn', { write: (s: string) => { logs.push(JSON.parse(s) as LogLine) } })
        : createLogger('silent')
      const d = createDaemon(config, { logger })
      await d.start()
      nodes.push(d)
      return d
    },
    async close () {
      await stopNodes()
      await Promise.all(dirs.splice(0).map(async d => await rm(d, { recursive: true, force: true })))
    },
  }
}

/** Polls `cond` every 20 ms; resolves with the ms it took, or throws after `timeoutMs`. */
export async function until (what: string, cond: () => boolean | Promise<boolean>, timeoutMs = 15_000): Promise<number> {
  const t0 = Date.now()
  while (!(await cond())) {
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out waiting for ${what}`)
    await new Promise(resolve => setTimeout(resolve, 20))
  }
  return Date.now() - t0
}
