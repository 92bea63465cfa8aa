// What `pullmesh start` loads. Module loading is most of a daemon's start-up, so `start` must not load
// what only other commands or other paths need: the prefetch/configure/admin/status commands (and
// cli-progress), fastify's schema compilers (ajv, fast-json-stringify: no route has a schema), and the
// peer source with the mesh off. The real CLI runs with a preload that records every module it loads:
// ES modules through a resolve hook, CommonJS ones from the require cache at exit.
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { pathToFileURL } from 'node:url'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { startDaemon } from '../helpers/daemon-process.js'
import { startFaultUpstream, type FaultUpstream } from '../helpers/fault-upstream.js'

const HOOKS = `
import { appendFileSync } from 'node:fs'
let out
export async function initialize (data) { out = data.out }
export async function resolve (specifier, context, next) {
  const r = await next(specifier, context)
  appendFileSync(out, r.url + '\\n')
  return r
}
`

const preload = (out: string): string => `
import { register, createRequire } from 'node:module'
import { appendFileSync } from 'node:fs'
import { pathToFileURL } from 'node:url'
register('data:text/javascript,' + encodeURIComponent(${JSON.stringify(HOOKS)}), { data: { out: ${JSON.stringify(out)} } })
process.on('exit', () => {
  appendFileSync(${JSON.stringify(out)}, Object.keys(createRequire(import.meta.url).cache).map(p => pathToFileURL(p).href).join('\\n') + '\\n')
})
`

describe('pullmesh start loads only what it runs', () => {
  let up: FaultUpstream
  let dir: string
  let loaded: string[]

  beforeAll(async () => {
    up = await startFaultUpstream()
    dir = await mkdtemp(join(tmpdir(), 'pm-imports-'))
    const out = join(dir, 'modules.txt')
    const pre = join(dir, 'preload.mjs')
    await writeFile(pre, preload(out))
    await writeFile(out, '')
    const d = await startDaemon({
      dataDir: join(dir, 'data'),
      upstreams: { 'imports.test': up.url },
      env: { ...process.env, NODE_OPTIONS: `${process.env.NODE_OPTIONS ?? ''} --import ${pathToFileURL(pre).href}` },
    })
    // The daemon answers: it has started for real, not just loaded.
    expect((await fetch(`${d.url}/v2/`)).status).toBe(200)
    expect(await d.stop()).toBe(0)
    loaded = (await readFile(out, 'utf8')).split('\n').filter(l => l !== '')
  })

  afterAll(async () => {
    await up?.close()
    if (dir !== undefined) await rm(dir, { recursive: true, force: true })
  })

  const has = (re: RegExp): boolean => loaded.some(u => re.test(u))

  it('records what it loads (the recorder works)', () => {
    expect(has(/\/dist\/daemon\.js$/)).toBe(true)
    expect(has(/\/dist\/cli\/index\.js$/)).toBe(true)
    expect(has(/\/node_modules\/fastify\/fastify\.js$/)).toBe(true)
    expect(has(/\/node_modules\/undici\//)).toBe(true)
  })

  it('does not load the other commands or cli-progress', () => {
    expect(loaded.filter(u => /\/dist\/cli\/(prefetch|configure|containerd-running|admin|status|keygen)\.js$/.test(u))).toEqual([])
    expect(loaded.filter(u => /\/node_modules\/cli-progress\//.test(u))).toEqual([])
  })

  it("does not load fastify's schema compilers", () => {
    // fastify's prebuilt error serializer needs fast-json-stringify's small runtime (lib/serializer.js), not its compiler.
    expect(loaded.filter(u => /\/node_modules\/(ajv|@fastify\/ajv-compiler|@fastify\/fast-json-stringify-compiler)\/|\/node_modules\/fast-json-stringify\/index\.js$/.test(u))).toEqual([])
  })

  it('does not load the peer source or libp2p with the mesh off', () => {
    expect(loaded.filter(u => /\/dist\/(content\/peer-source|mesh\/mesh)\.js$|\/node_modules\/(libp2p|@libp2p)\//.test(u))).toEqual([])
  })
})
