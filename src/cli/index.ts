import { readFileSync } from 'node:fs'
import { Command, CommanderError, Option } from 'commander'
import type { Writable } from 'node:stream'
import { buildConfig, mergeSettings, settingsFromEnv, settingsFromFile, type RawSettings } from '../config.js'
import { ConfigError } from '../errors.js'
import { createLogger } from '../logger.js'
import { createDaemon } from '../daemon.js'

/** Everything the CLI needs from the process, handed in by main.ts. */
export interface CliIo {
  env: Record<string, string | undefined>
  stdout: Writable
  stderr: Writable
  /** Resolves with the signal name when the process is asked to stop. */
  stopRequested: () => Promise<string>
  /** Registers what to do when the process is asked to reload (SIGHUP); returns the unregister function. */
  onReload?: (fn: () => void) => () => void
}

const VERSION = (JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string }).version

const collect = (v: string, prev: string[] = []): string[] => [...prev, v]

/** Runs the CLI. Returns the process exit code. */
export async function runCli (argv: string[], io: CliIo): Promise<number> {
  let exitCode = 0
  const program = new Command()
    .name('pullmesh')
    .description('A LAN-meshed, verified OCI pull-through cache for Docker, containerd, podman and skopeo')
    .version(VERSION)
    .exitOverride()
    .configureOutput({ writeOut: s => io.stdout.write(s), writeErr: s => io.stderr.write(s) })
    .showHelpAfterError()

  program.command('start')
    .description('run the daemon in the foreground')
    .option('-c, --config <file>', 'JSON config file (flags and PULLMESH_* variables override it)')
    .option('--listen <host:port>', 'client-facing registry address (default 127.0.0.1:5000)')
    .option('--data-dir <dir>', 'where blobs and the index live (default $XDG_DATA_HOME/pullmesh)')
    .option('--upstream <name=url>', 'an upstream registry; repeatable (default docker.io=https://registry-1.docker.io)', collect)
    .option('--default-upstream <name>', 'upstream for names without a registry host (default: the first)')
    .option('--credentials-file <file>', 'JSON {"<upstream>": {"username", "password"}}; never logged')
    .option('--tag-ttl <duration>', 'answer tags from cache for this long before revalidating (default 5m)')
    .option('--max-size <size>', 'disk budget; least recently used content is evicted (default 20GiB)')
    .option('--max-age <duration>', 'evict content not accessed for this long, or "off" (default 30d)')
    .option('--log-level <level>', 'fatal|error|warn|info|debug|trace|silent (default info)')
    .option('--no-mdns', 'do not discover peers with mDNS')
    .option('--mdns-interval <duration>', 'how often to send an mDNS query after the first few seconds (default 60s)')
    .option('--no-mesh', 'run without the LAN mesh (no libp2p at all)')
    .option('--bootstrap-dns <name[:port]>', 'a DNS name resolving to peers (e.g. a Kubernetes headless Service), re-resolved every 30 s; repeatable', collect)
    .option('--no-peer-exchange', 'do not dial peers that other peers tell us about')
    .option('--bootstrap <multiaddr>', 'a peer to dial; repeatable', collect)
    .option('--p2p-listen <multiaddr>', 'mesh listen address; repeatable (default /ip4/0.0.0.0/tcp/4001)', collect)
    .option('--peer-listen <host:port>', 'address of the peer data path (default 0.0.0.0:5050)')
    .option('--mesh-key <file>', 'private mesh: only nodes holding this key (pullmesh keygen) can join')
    .option('--peer-timeout <duration>', 'how long a peer may take to start a transfer (default 500ms)')
    .option('--peer-min-rate <size>', 'a transfer from a peer slower than this per second moves on to the next source; 0 = off (default 64KiB)')
    .option('--peer-rate-window <duration>', 'the window over which --peer-min-rate is measured (default 5s)')
    .option('--routing <mode>', 'how holders are found: gossip (full inventory with every peer), dht (Kademlia provider records), both (default; gossip with --no-peer-exchange)')
    .option('--dht-deadline <duration>', 'a DHT lookup that has found no holder by then falls through to the next source (default 300ms)')
    .option('--no-delegate', 'fetch every miss from the upstream directly instead of asking the node chosen to fetch it for the mesh')
    .option('--upstream-connect-timeout <duration>', 'default 10s')
    .option('--upstream-headers-timeout <duration>', 'default 30s')
    .option('--upstream-body-timeout <duration>', 'idle time allowed mid-body (default 60s)')
    .option('--upstream-retries <n>', 'attempts for idempotent upstream requests (default 3)')
    .option('--upstream-deadline <duration>', 'a miss fails if the upstream has not answered within this, retries included (default 10s)')
    .option('--upstream-hold <duration>', 'after the upstream was unreachable, fail requests to it at once for this long, or "off" (default 15s)')
    .option('--upstream-proxy <name=url>', 'proxy for one upstream (http://, https://, socks5:// or "direct"); repeatable; default HTTP(S)_PROXY/NO_PROXY', collect)
    .option('--tls-cert <file>', 'serve the client API over HTTPS with this PEM certificate (chain); re-read on SIGHUP')
    .option('--tls-key <file>', 'the PEM private key for --tls-cert; re-read on SIGHUP')
    .option('--shutdown-grace <duration>', 'on SIGTERM, downloads in flight get this long to finish (default 10s)')
    .option('--share-credentialed <upstream>', 'share content pulled with credentials for this upstream with peers; repeatable', collect)
    .action(async (_opts: Record<string, unknown>, cmd: Command) => {
      exitCode = await start(cmd, io)
    })

  // commander runs the command its first operand names, so `pullmesh start ...` never needs the other
  // commands: their modules (and cli-progress, the prefetch bars) load only for another first argument.
  if (argv[0] !== 'start') {
    const [{ registerStatus }, { registerPrefetch }, { registerAdmin }, { registerKeygen }, { registerConfigure }] = await Promise.all([
      import('./status.js'), import('./prefetch.js'), import('./admin.js'), import('./keygen.js'), import('./configure.js'),
    ])
    registerStatus(program, io, code => { exitCode = code })
    registerPrefetch(program, io, code => { exitCode = code })
    registerAdmin(program, io, code => { exitCode = code })
    registerKeygen(program, io, code => { exitCode = code })
    registerConfigure(program, io, code => { exitCode = code })
  }

  try {
    await program.parseAsync(argv, { from: 'user' })
  } catch (err) {
    if (err instanceof CommanderError) return err.exitCode === 0 ? 0 : 2
    throw err
  }
  return exitCode
}

/** Only options given on the command line count as flags; commander's defaults must not mask env or file. */
function flagSettings (cmd: Command): RawSettings {
  const out: Record<string, unknown> = {}
  for (const opt of cmd.options as Option[]) {
    const key = opt.attributeName()
    if (cmd.getOptionValueSource(key) !== 'cli') continue
    out[key] = cmd.getOptionValue(key)
  }
  return out as RawSettings
}

async function start (cmd: Command, io: CliIo): Promise<number> {
  const flags = flagSettings(cmd) as RawSettings & { config?: string }
  const problems: string[] = []
  const configFile = flags.config ?? io.env.PULLMESH_CONFIG
  const file = configFile !== undefined ? settingsFromFile(configFile, problems) : {}
  let config
  try {
    config = buildConfig(mergeSettings(file, settingsFromEnv(io.env), flags), io.env, problems)
  } catch (err) {
    if (err instanceof ConfigError) {
      io.stderr.write(`pullmesh: ${err.message}\n`)
      return 2
    }
    throw err
  }
  const logger = createLogger(config.logLevel)
  const daemon = createDaemon(config, { logger, version: VERSION })
  try {
    await daemon.start()
  } catch (err) {
    logger.fatal({ err }, 'pullmesh failed to start')
    await daemon.stop().catch(() => {})
    return 1
  }
  io.stderr.write(`pullmesh listening on ${daemon.url()} (data in ${config.dataDir})\n`)
  const offReload = io.onReload?.(() => { void daemon.reload() })
  const signal = await io.stopRequested()
  offReload?.()
  logger.info({ signal }, 'stopping')
  await daemon.stop()
  logger.flush()
  return 0
}
