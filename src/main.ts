#!/usr/bin/env node
// The process boundary: argv, env, signals and the exit code are touched here and nowhere else.
import './polyfills.js'
import { runCli } from './cli/index.js'

const stopRequested = (): Promise<string> => new Promise(resolve => {
  const onSignal = (sig: string): void => {
    process.off('SIGINT', onSignal)
    process.off('SIGTERM', onSignal)
    // A second signal while stopping forces the exit.
    process.once('SIGINT', () => process.exit(130))
    process.once('SIGTERM', () => process.exit(143))
    resolve(sig)
  }
  process.on('SIGINT', onSignal)
  process.on('SIGTERM', onSignal)
})

/** SIGHUP asks for a reload (the TLS certificate and key are read again). */
const onReload = (fn: () => void): (() => void) => {
  const handler = (): void => { fn() }
  process.on('SIGHUP', handler)
  return () => { process.off('SIGHUP', handler) }
}

runCli(process.argv.slice(2), { env: process.env, stdout: process.stdout, stderr: process.stderr, stopRequested, onReload })
  .then(code => { process.exitCode = code })
  .catch((err: unknown) => {
    process.stderr.write(`pullmesh: ${err instanceof Error ? err.stack ?? err.message : String(err)}\n`)
    process.exitCode = 1
  })
