// One in-process daemon (mesh off) in front of a fault-injecting upstream named `fault.test`, with its
// data in a temp dir: the set-up of the tests that drive the client data path against injected faults.
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { buildConfig, type RawSettings } from '../../src/config.js'
import { createDaemon, type Daemon } from '../../src/daemon.js'
import { createLogger, type Logger } from '../../src/logger.js'
import { startFaultUpstream, type FaultUpstream } from './fault-upstream.js'

export const FAULT_UPSTREAM = 'fault.test'

export interface FaultDaemon {
  up: FaultUpstream
  daemon: Daemon
  dir: string
  /** Stops the daemon and the upstream, and removes the data dir. */
  close: () => Promise<void>
}

export async function startFaultDaemon (o: { dirPrefix: string, settings?: RawSettings, logger?: Logger }): Promise<FaultDaemon> {
  const up = await startFaultUpstream()
  const dir = await mkdtemp(join(tmpdir(), o.dirPrefix))
  const daemon = createDaemon(buildConfig({
    listen: '127.0.0.1:0', dataDir: dir, upstream: [`${FAULT_UPSTREAM}=${up.url}`], mesh: false, mdns: false, ...o.settings,
  }, {}), { logger: o.logger ?? createLogger('silent') })
  try {
    await daemon.start()
  } catch (err) {
    await up.close()
    await rm(dir, { recursive: true, force: true })
    throw err
  }
  return {
    up,
    daemon,
    dir,
    async close () {
      await daemon.stop()
      await up.close()
      await rm(dir, { recursive: true, force: true })
    },
  }
}
