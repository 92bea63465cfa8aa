// Safer defaults, as a user starts pullmesh: an open (keyless) mesh listening on every interface says so in
// one warn line at start-up, with how to close it; a keyed mesh does not. Each daemon runs in a network
// namespace of its own, so that listening on 0.0.0.0 exposes nothing outside the test.
import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { startDaemon, type DaemonProcess } from '../helpers/daemon-process.js'
import { createNetnsLab, type NetnsLab } from '../helpers/netns.js'
import { generateMeshKey } from '../../src/mesh/index.js'

let lab: NetnsLab | undefined
let work = ''
const procs: DaemonProcess[] = []

async function start (extraArgs: string[]): Promise<DaemonProcess> {
  const d = await startDaemon({
    netns: lab!.nodes[0]!.ns,
    dataDir: await mkdtemp(join(work, 'data-')),
    upstreams: { 'up.test': 'http://127.0.0.1:9' },
    mesh: true,
    meshListen: { p2p: ['/ip4/0.0.0.0/tcp/4001'], peer: '0.0.0.0:5050' },
    logLevel: 'info',
    extraArgs,
    startTimeoutMs: 30_000,
  })
  lab!.track(d.pid)
  procs.push(d)
  return d
}

const openMeshLines = (d: DaemonProcess): Array<{ level: number, msg: string }> =>
  d.logs().flatMap(l => { try { return [JSON.parse(l) as { level: number, msg: string }] } catch { return [] } })
    .filter(l => typeof l.msg === 'string' && l.msg.startsWith('open mesh'))

describe('e2e: start-up warning for an open mesh', () => {
  beforeAll(async () => {
    work = await mkdtemp(join(tmpdir(), 'pullmesh-openmesh-'))
    lab = await createNetnsLab({ nodes: 1 })
  }, 60_000)
  afterAll(async () => {
    for (const d of procs) if (!d.exited()) await d.stop('SIGTERM', 10_000).catch(() => {})
    await lab?.teardown()
    if (work !== '') await rm(work, { recursive: true, force: true })
  }, 60_000)

  it('a keyless mesh on 0.0.0.0 logs one warn line saying how to close it; a keyed one does not', async () => {
    const open = await start([])
    const lines = openMeshLines(open)
    expect(lines).toHaveLength(1)
    expect(lines[0]!.level).toBe(40)
    expect(lines[0]!.msg).toContain('/ip4/0.0.0.0/tcp/4001')
    expect(lines[0]!.msg).toContain('0.0.0.0:5050')
    expect(lines[0]!.msg).toContain('pullmesh keygen FILE')
    expect(lines[0]!.msg).toContain('--mesh-key FILE')
    await open.stop('SIGTERM', 10_000)

    const key = join(work, 'mesh.key')
    await writeFile(key, `${Buffer.from(generateMeshKey()).toString('utf8')}\r\n`, { mode: 0o600 })
    const keyed = await start(['--mesh-key', key])
    expect(openMeshLines(keyed)).toHaveLength(0)
    expect(keyed.logs().some(l => l.includes('"msg":"mesh started"') && l.includes('"private":true'))).toBe(true)
  })
})
