// What this machine can check of the deployment files without a Docker engine or a cluster:
// the systemd unit with `systemd-analyze verify`, the YAML (parsed by python3's PyYAML) and the keys
// that matter, the Dockerfile's stages and instructions, the HEALTHCHECK script against a live
// server, and the DaemonSet's configure init container run with the real CLI.
import { createServer, type Server } from 'node:http'
import { chmod, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { DAEMON_ENTRY, REPO_ROOT } from '../helpers/daemon-process.js'
import { run, which } from '../helpers/exec.js'
import { loadYaml } from '../helpers/yaml.js'

let work = ''
beforeAll(async () => { work = await mkdtemp(join(tmpdir(), 'pullmesh-deploy-')) })
afterAll(async () => { await rm(work, { recursive: true, force: true }) })

const repoFile = async (p: string): Promise<string> => await readFile(join(REPO_ROOT, p), 'utf8')

// ------------------------------------------------------------ systemd

describe('deploy/pullmesh.service', () => {
  it('passes systemd-analyze verify with no warnings', async () => {
    if (which('systemd-analyze') === undefined) throw new Error('systemd-analyze is missing on PATH (apt-get install -y systemd)')
    const unit = await repoFile('deploy/pullmesh.service')
    const exec = /^ExecStart=(\S+)/m.exec(unit)?.[1]
    expect(exec, 'ExecStart').toBe('/usr/local/bin/pullmesh')
    // verify insists that ExecStart's binary exists: point it at a stub, change nothing else.
    const stub = join(work, 'pullmesh')
    await writeFile(stub, '#!/bin/sh\nexit 0\n')
    await chmod(stub, 0o755)
    const copy = join(work, 'pullmesh.service')
    await writeFile(copy, unit.replace(/^ExecStart=\S+/m, `ExecStart=${stub}`))
    const r = await run('systemd-analyze', ['verify', copy], { allowFailure: true, timeoutMs: 60_000 })
    // verify exits 0 on unknown keys and bad values, so its output must be empty too.
    expect({ code: r.code, output: (r.stdout + r.stderr).trim() }).toEqual({ code: 0, output: '' })
  })

  it('runs as a dedicated user with state in /var/lib/pullmesh, hardened, and stops with SIGTERM', async () => {
    const unit = await repoFile('deploy/pullmesh.service')
    const settings = new Map<string, string[]>()
    for (const line of unit.split('\n')) {
      const m = /^([A-Za-z]+)=(.*)$/.exec(line.trim())
      if (m?.[1] !== undefined) settings.set(m[1], [...(settings.get(m[1]) ?? []), m[2] ?? ''])
    }
    const one = (k: string): string | undefined => settings.get(k)?.at(-1)
    expect(one('DynamicUser') === 'yes' || one('User') === 'pullmesh', 'DynamicUser=yes or User=pullmesh').toBe(true)
    expect(one('StateDirectory')).toBe('pullmesh')
    expect(settings.get('Environment')).toContain('PULLMESH_DATA_DIR=/var/lib/pullmesh')
    expect(one('EnvironmentFile')).toBe('-/etc/pullmesh/env')
    expect(one('KillSignal')).toBe('SIGTERM')
    expect(one('Restart')).toBe('on-failure')
    for (const [k, v] of Object.entries({
      NoNewPrivileges: 'yes', ProtectSystem: 'strict', ProtectHome: 'yes', PrivateTmp: 'yes', PrivateDevices: 'yes',
      CapabilityBoundingSet: '', RestrictAddressFamilies: 'AF_INET AF_INET6 AF_UNIX AF_NETLINK',
    })) expect(one(k), k).toBe(v)
    expect(settings.get('SystemCallFilter')).toContain('@system-service')
    // V8 needs W+X memory for its JIT.
    expect(settings.has('MemoryDenyWriteExecute')).toBe(false)
    expect(one('WantedBy')).toBe('multi-user.target')
  })
})

// ------------------------------------------------------------ Dockerfile

interface Instruction { op: string, args: string, stage: number }

function parseDockerfile (text: string): { instructions: Instruction[], stages: Array<{ from: string, name?: string }>, args: Map<string, string> } {
  const joined = text.split('\n').filter(l => !/^\s*#/.test(l)).join('\n').replace(/\\\n/g, ' ')
  const instructions: Instruction[] = []
  const stages: Array<{ from: string, name?: string }> = []
  const args = new Map<string, string>()
  for (const raw of joined.split('\n')) {
    const line = raw.trim()
    if (line === '') continue
    const m = /^(\w+)\s+(.*)$/.exec(line)
    if (m === null) throw new Error(`unparsable Dockerfile line: ${line}`)
    const op = (m[1] ?? '').toUpperCase()
    const rest = m[2] ?? ''
    if (op === 'ARG' && stages.length === 0) {
      const [k, v] = rest.split('=')
      if (k !== undefined && v !== undefined) args.set(k.trim(), v.trim())
    }
    if (op === 'FROM') {
      const f = /^(\S+)(?:\s+AS\s+(\S+))?$/i.exec(rest)
      const from = (f?.[1] ?? '').replace(/^\$\{(\w+)\}$/, (_, k: string) => args.get(k) ?? `\${${k}}`)
      stages.push(f?.[2] !== undefined ? { from, name: f[2] } : { from })
    }
    instructions.push({ op, args: rest, stage: stages.length - 1 })
  }
  return { instructions, stages, args }
}

describe('Dockerfile', () => {
  it('builds in stages on Node 22: npm ci + tsc, then production dependencies only', async () => {
    const { instructions, stages } = parseDockerfile(await repoFile('Dockerfile'))
    expect(stages.length).toBeGreaterThanOrEqual(2)
    for (const s of stages) expect(s.from, 'every stage runs on Node 22').toMatch(/^node:22([.-]|$)/)
    const runs = (stage: number): string => instructions.filter(i => i.stage === stage && i.op === 'RUN').map(i => i.args).join('\n')
    const buildStage = stages.findIndex((_, i) => /npm ci/.test(runs(i)) && /\btsc\b/.test(runs(i)))
    expect(buildStage, 'a stage runs npm ci and tsc').toBeGreaterThanOrEqual(0)
    const last = stages.length - 1
    const copiesInto = instructions.filter(i => i.stage === last && i.op === 'COPY').map(i => i.args)
    // The runtime's node_modules come from an `npm ci --omit=dev` stage, never from the build stage.
    const nm = copiesInto.find(c => /node_modules/.test(c))
    const from = /--from=(\S+)/.exec(nm ?? '')?.[1]
    const depsStage = stages.findIndex(s => s.name === from)
    expect(depsStage, `the stage node_modules is copied from (${from})`).toBeGreaterThanOrEqual(0)
    expect(runs(depsStage)).toMatch(/npm ci[^\n]*--omit=dev/)
    expect(copiesInto.some(c => c.includes(`--from=${stages[buildStage]?.name}`) && /dist/.test(c)), 'dist comes from the build stage').toBe(true)
    expect(runs(last), 'the runtime stage installs nothing with npm').not.toMatch(/npm (ci|install)/)
  })

  it('runs as a non-root user with a data volume, the three ports, a /healthz HEALTHCHECK and the CLI entrypoint', async () => {
    const { instructions, stages } = parseDockerfile(await repoFile('Dockerfile'))
    const last = stages.length - 1
    const final = instructions.filter(i => i.stage === last)
    const get = (op: string): string | undefined => final.filter(i => i.op === op).at(-1)?.args
    const user = get('USER') ?? ''
    expect(user).not.toBe('')
    expect(user.split(':')[0]).not.toMatch(/^(root|0)$/)
    expect(JSON.parse(get('VOLUME') ?? '[]')).toContain('/var/lib/pullmesh')
    expect(final.find(i => i.op === 'ENV' && /PULLMESH_DATA_DIR=\/var\/lib\/pullmesh/.test(i.args))).toBeDefined()
    expect((get('EXPOSE') ?? '').split(/\s+/).sort()).toEqual(['4001', '5000', '5050'])
    expect(JSON.parse(get('ENTRYPOINT') ?? 'null')).toEqual(['node', 'dist/main.js'])
    expect((JSON.parse(get('CMD') ?? '[]') as string[]).slice(0, 3)).toEqual(['start', '--listen', '0.0.0.0:5000'])
    const hc = get('HEALTHCHECK') ?? ''
    expect(hc).toMatch(/CMD \["node", "-e", /)
    expect(hc).toContain('/healthz')
  })

  it('the HEALTHCHECK script exits 0 on a healthy answer and 1 otherwise', async () => {
    const { instructions } = parseDockerfile(await repoFile('Dockerfile'))
    const hc = instructions.filter(i => i.op === 'HEALTHCHECK').at(-1)?.args ?? ''
    const argv = JSON.parse(hc.slice(hc.indexOf('CMD ') + 4)) as string[]
    const script = argv[2] ?? ''
    expect(script).toContain('http://127.0.0.1:5000/healthz')
    let status = 200
    const server: Server = createServer((req, res) => { res.statusCode = req.url === '/healthz' ? status : 404; res.end() })
    await new Promise<void>(resolve => server.listen(0, '127.0.0.1', resolve))
    try {
      const port = (server.address() as { port: number }).port
      const local = script.replace('127.0.0.1:5000', `127.0.0.1:${port}`)
      expect((await run(process.execPath, ['-e', local], { allowFailure: true, timeoutMs: 20_000 })).code).toBe(0)
      status = 503
      expect((await run(process.execPath, ['-e', local], { allowFailure: true, timeoutMs: 20_000 })).code).toBe(1)
      await new Promise<void>(resolve => server.close(() => resolve()))
      expect((await run(process.execPath, ['-e', local], { allowFailure: true, timeoutMs: 20_000 })).code, 'nothing listening').toBe(1)
    } finally {
      server.closeAllConnections()
      if (server.listening) await new Promise<void>(resolve => server.close(() => resolve()))
    }
  })

  it('copies only files that exist and that .dockerignore keeps in the context', async () => {
    const { instructions } = parseDockerfile(await repoFile('Dockerfile'))
    const ignore = (await repoFile('.dockerignore')).split('\n').map(l => l.trim()).filter(l => l !== '' && !l.startsWith('#'))
    for (const must of ['node_modules', 'dist', '.git']) expect(ignore, `.dockerignore lists ${must}`).toContain(must)
    const sources = instructions.filter(i => i.op === 'COPY' && !i.args.includes('--from=')).flatMap(i => i.args.split(/\s+/).slice(0, -1))
    expect(sources.length).toBeGreaterThan(0)
    const top = new Set(await readdir(REPO_ROOT))
    for (const s of sources) {
      const first = s.replace(/^\.\//, '').split('/')[0] ?? ''
      expect(top.has(first), `COPY source ${s} exists`).toBe(true)
      expect(ignore.includes(first) || ignore.includes(s), `COPY source ${s} is not ignored`).toBe(false)
    }
  })
})

// ------------------------------------------------------------ compose and Kubernetes

describe('deploy/docker-compose.yml', () => {
  it('parses, runs on the host network with a data volume', async () => {
    const [doc] = await loadYaml('deploy/docker-compose.yml')
    const svc = doc.services.pullmesh
    expect(svc.network_mode).toBe('host')
    expect(svc.build.dockerfile).toBe('Dockerfile')
    expect(svc.volumes.some((v: string) => v.endsWith(':/var/lib/pullmesh'))).toBe(true)
    expect(svc.command[0]).toBe('start')
    expect(svc.healthcheck.test.join(' ')).toMatch(/\/(healthz|readyz)/)
  })
})

describe('deploy/kubernetes/daemonset.yaml', () => {
  let docs: any[] = []
  let ds: any
  beforeAll(async () => {
    docs = await loadYaml('deploy/kubernetes/daemonset.yaml')
    ds = docs.find(d => d?.kind === 'DaemonSet')
  })

  it('is a DaemonSet on the host network with a hostPath data dir', () => {
    expect(ds, 'a DaemonSet document').toBeDefined()
    expect(ds.apiVersion).toBe('apps/v1')
    const spec = ds.spec.template.spec
    expect(ds.spec.selector.matchLabels).toEqual(ds.spec.template.metadata.labels)
    expect(spec.hostNetwork).toBe(true)
    expect(spec.dnsPolicy).toBe('ClusterFirstWithHostNet')
    const data = spec.volumes.find((v: any) => v.hostPath?.path === '/var/lib/pullmesh')
    expect(data, 'hostPath /var/lib/pullmesh').toBeDefined()
    const main = spec.containers.find((c: any) => c.name === 'pullmesh')
    expect(main.volumeMounts.find((m: any) => m.name === data.name)?.mountPath).toBe('/var/lib/pullmesh')
  })

  it('probes /healthz and /readyz, sets requests and limits, and runs non-root and locked down', () => {
    const spec = ds.spec.template.spec
    const main = spec.containers.find((c: any) => c.name === 'pullmesh')
    expect(main.livenessProbe.httpGet.path).toBe('/healthz')
    expect(main.readinessProbe.httpGet.path).toBe('/readyz')
    // The registry listens on loopback: the kubelet (host network) must probe 127.0.0.1.
    expect(main.args).toEqual(expect.arrayContaining(['--listen', '127.0.0.1:5000']))
    expect(main.livenessProbe.httpGet.host).toBe('127.0.0.1')
    for (const k of ['cpu', 'memory']) {
      expect(main.resources.requests[k], `requests.${k}`).toBeDefined()
      expect(main.resources.limits[k], `limits.${k}`).toBeDefined()
    }
    const sc = main.securityContext
    expect(sc.runAsNonRoot).toBe(true)
    expect(sc.runAsUser).not.toBe(0)
    expect(sc.allowPrivilegeEscalation).toBe(false)
    expect(sc.readOnlyRootFilesystem).toBe(true)
    expect(sc.capabilities.drop).toEqual(['ALL'])
    for (const c of [...spec.initContainers, ...spec.containers]) {
      expect(c.securityContext?.allowPrivilegeEscalation, `${c.name}: allowPrivilegeEscalation`).toBe(false)
      expect(c.securityContext?.capabilities?.drop, `${c.name}: drops all capabilities`).toEqual(['ALL'])
      expect(c.resources?.limits?.memory, `${c.name}: memory limit`).toBeDefined()
    }
    expect(main.ports.map((p: any) => p.containerPort).sort()).toEqual([4001, 5000, 5050])
  })

  it('its init container writes containerd hosts.toml on the node: run with the real CLI and the ConfigMap', async () => {
    const spec = ds.spec.template.spec
    const init = spec.initContainers.find((c: any) => (c.args ?? []).includes('containerd'))
    expect(init, 'an init container running `configure containerd`').toBeDefined()
    expect(init.args.slice(0, 4)).toEqual(['configure', 'containerd', '--dir', '/host/etc/containerd/certs.d'])
    const certs = spec.volumes.find((v: any) => v.hostPath?.path === '/etc/containerd/certs.d')
    expect(init.volumeMounts.find((m: any) => m.name === certs?.name)?.mountPath).toBe('/host/etc/containerd/certs.d')

    const cmName = init.envFrom?.[0]?.configMapRef?.name
    const cm = docs.find(d => d?.kind === 'ConfigMap' && d.metadata.name === cmName)
    expect(cm, `ConfigMap ${cmName}`).toBeDefined()
    const dir = join(work, 'certs.d')
    const args = (init.args as string[]).map(a => a === '/host/etc/containerd/certs.d' ? dir : a)
    const r = await run(process.execPath, [DAEMON_ENTRY, ...args], {
      env: { PATH: process.env.PATH ?? '/usr/bin:/bin', HOME: work, ...cm.data },
      timeoutMs: 30_000,
    })
    expect(r.stdout).toContain('config_path')
    const expected = (cm.data.PULLMESH_UPSTREAMS as string).split(',').map(s => s.split('=')[0])
    expect((await readdir(dir)).sort()).toEqual([...expected].sort())
    const hub = await readFile(join(dir, 'docker.io', 'hosts.toml'), 'utf8')
    expect(hub).toContain('server = "https://registry-1.docker.io"')
    expect(hub).toContain('[host."http://127.0.0.1:5000"]')
  })
})
