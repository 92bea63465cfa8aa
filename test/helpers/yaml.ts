// YAML for the deployment tests, parsed by python3's PyYAML (safe_load_all) and handed over as JSON:
// no YAML parser is among the npm dependencies, and Debian's python3-yaml is one .ci/run installs.
import { join } from 'node:path'
import { REPO_ROOT } from './daemon-process.js'
import { run, which } from './exec.js'

/**
 * A python3 that can `import yaml`. Debian's /usr/bin/python3 comes first: that is where the
 * python3-yaml package installs (a pyenv or venv python3 earlier on PATH may lack it).
 */
let python: string | undefined
export async function pythonWithYaml (): Promise<string> {
  if (python !== undefined) return python
  const candidates = [...new Set(['/usr/bin/python3', which('python3')].filter((p): p is string => p !== undefined))]
  for (const p of candidates) {
    const r = await run(p, ['-c', 'import yaml'], { allowFailure: true, timeoutMs: 30_000 }).catch(() => undefined)
    if (r?.code === 0) { python = p; return p }
  }
  throw new Error(`no python3 with the yaml module (tried: ${candidates.join(', ') || 'none on PATH'}): apt-get install -y python3-yaml`)
}

const SCRIPT = 'import json, sys, yaml\nprint(json.dumps(list(yaml.safe_load_all(sys.stdin.read() if sys.argv[1] == "-" else open(sys.argv[1])))))'

/** Every YAML document in `text` (`what` names it in errors). */
export async function parseYaml (text: string, what = 'YAML'): Promise<any[]> {
  const r = await run(await pythonWithYaml(), ['-c', SCRIPT, '-'], { input: text, allowFailure: true, timeoutMs: 30_000 })
  if (r.code !== 0) throw new Error(`${what} does not parse as YAML:\n${r.stderr}`)
  return JSON.parse(r.stdout) as any[]
}

/** Every YAML document in the repository file `path`. */
export async function loadYaml (path: string): Promise<any[]> {
  const r = await run(await pythonWithYaml(), ['-c', SCRIPT, join(REPO_ROOT, path)], { allowFailure: true, timeoutMs: 30_000 })
  if (r.code !== 0) throw new Error(`${path} does not parse as YAML:\n${r.stderr}`)
  return JSON.parse(r.stdout) as any[]
}
