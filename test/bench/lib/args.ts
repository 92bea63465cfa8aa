// Command-line arguments of the standalone bench tools (cold-fill.ts, cold-fill-cpu.ts).
import { DAEMON_ENTRY } from './procs.js'

/** The value after flag `n`, or `d`. */
export function arg (argv: readonly string[], n: string, d: string): string {
  const i = argv.indexOf(n)
  return i >= 0 ? argv[i + 1] ?? d : d
}

/** Every `--entry NAME=PATH` (or `--entry PATH`), in order; this build's dist/main.js when none is given. */
export function entries (argv: readonly string[]): Array<[string, string]> {
  const out: Array<[string, string]> = []
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] !== '--entry') continue
    const v = argv[i + 1] ?? ''
    const eq = v.indexOf('=')
    out.push(eq > 0 ? [v.slice(0, eq), v.slice(eq + 1)] : [v, v])
  }
  if (out.length === 0) out.push(['pullmesh', DAEMON_ENTRY])
  return out
}
