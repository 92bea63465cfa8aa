// The Helm chart in deploy/helm/pullmesh, rendered without helm (not packaged for Debian): a small
// renderer below implements the subset of Go templates the chart uses, and the rendered YAML (parsed by
// PyYAML) must equal the plain manifests in deploy/kubernetes with the default values. Then the things
// that matter: discovery through the headless Service, the mesh key from a Secret, the ConfigMap as the
// daemon and `pullmesh configure` read it, and what changing the values changes.
// (`kubectl apply --dry-run=client` needs a cluster's OpenAPI, so the schema is not checked here.)
import { mkdtemp, readdir, readFile, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { buildConfig, settingsFromEnv } from '../../src/config.js'
import { parseMeshKey } from '../../src/mesh/psk.js'
import { DAEMON_ENTRY, REPO_ROOT } from '../helpers/daemon-process.js'
import { run } from '../helpers/exec.js'
import { loadYaml, parseYaml } from '../helpers/yaml.js'

const CHART = 'deploy/helm/pullmesh'
const PLAIN = 'deploy/kubernetes/daemonset.yaml'

// ------------------------------------------------------------ a Go-template subset

/**
 * Text, `{{ expr }}`, `{{ if expr }}…{{ else }}…{{ end }}` and `{{/* comments *\/}}`, with Go's `{{-` / `-}}`
 * whitespace trimming. An expression is a pipeline of commands: `.Values.a.b`, `.Release.Name`,
 * `.Release.Namespace`, `.Chart.X`, a "string" or a number, or a function with arguments, the piped
 * value last: quote, b64enc, toYaml, nindent N, not. A missing value is an error (helm would print
 * `<no value>`). toYaml writes JSON, which is YAML too: the test compares parsed documents, not text.
 */
type Node = { t: 'text', v: string } | { t: 'expr', v: string } | { t: 'if', cond: string, then: Node[], else: Node[] }

function parseTemplate (src: string, file: string): Node[] {
  const re = /\{\{(-?)\s*([\s\S]*?)\s*(-?)\}\}/g
  const tokens: Array<{ t: 'text' | 'action', v: string }> = []
  let last = 0
  let trimNext = false
  for (let m = re.exec(src); m !== null; m = re.exec(src)) {
    let text = src.slice(last, m.index)
    if (trimNext) text = text.replace(/^\s+/, '')
    if (m[1] === '-') text = text.replace(/\s+$/, '')
    tokens.push({ t: 'text', v: text })
    tokens.push({ t: 'action', v: m[2] ?? '' })
    trimNext = m[3] === '-'
    last = re.lastIndex
  }
  tokens.push({ t: 'text', v: trimNext ? src.slice(last).replace(/^\s+/, '') : src.slice(last) })

  let i = 0
  function block (): { nodes: Node[], end: 'end' | 'else' | 'eof' } {
    const nodes: Node[] = []
    while (i < tokens.length) {
      const tok = tokens[i++]!
      if (tok.t === 'text') { if (tok.v !== '') nodes.push({ t: 'text', v: tok.v }); continue }
      const a = tok.v
      if (a.startsWith('/*')) { if (!a.endsWith('*/')) throw new Error(`${file}: unterminated comment`); continue }
      if (a === 'end' || a === 'else') return { nodes, end: a }
      const ifm = /^if\s+(.+)$/.exec(a)
      if (ifm !== null) {
        const then = block()
        let other: Node[] = []
        if (then.end === 'else') {
          const e = block()
          if (e.end !== 'end') throw new Error(`${file}: {{ else }} without {{ end }}`)
          other = e.nodes
        } else if (then.end !== 'end') throw new Error(`${file}: {{ if }} without {{ end }}`)
        nodes.push({ t: 'if', cond: ifm[1]!, then: then.nodes, else: other })
        continue
      }
      if (/^(range|with|define|template|include|block)\b/.test(a)) throw new Error(`${file}: {{ ${a} }} is outside the subset this renderer knows`)
      nodes.push({ t: 'expr', v: a })
    }
    return { nodes, end: 'eof' }
  }
  const top = block()
  if (top.end !== 'eof') throw new Error(`${file}: stray {{ ${top.end} }}`)
  return top.nodes
}

type Scope = Record<string, unknown>

function lookup (path: string, scope: Scope): unknown {
  let v: unknown = scope
  for (const k of path.slice(1).split('.')) {
    if (v === null || typeof v !== 'object' || !(k in v)) throw new Error(`no value at ${path}`)
    v = (v as Record<string, unknown>)[k]
  }
  return v
}

function truthy (v: unknown): boolean {
  if (v === undefined || v === null || v === false || v === 0 || v === '') return false
  if (Array.isArray(v)) return v.length > 0
  if (typeof v === 'object') return Object.keys(v).length > 0
  return true
}

function text (v: unknown): string {
  if (v === null || v === undefined) throw new Error('cannot print a missing value')
  return typeof v === 'object' ? JSON.stringify(v) : String(v)
}

const FUNCS: Record<string, (...args: unknown[]) => unknown> = {
  quote: (v) => JSON.stringify(text(v)),
  b64enc: (v) => Buffer.from(text(v)).toString('base64'),
  toYaml: (v) => JSON.stringify(v),
  nindent: (n, v) => '\n' + text(v).split('\n').map(l => ' '.repeat(Number(n)) + l).join('\n'),
  not: (v) => !truthy(v),
}

function evaluate (expr: string, scope: Scope): unknown {
  let piped: unknown
  let first = true
  for (const cmd of expr.split('|').map(c => c.trim())) {
    const words = cmd.match(/"(?:[^"\\]|\\.)*"|\S+/g) ?? []
    const arg = (w: string): unknown => w.startsWith('.') ? lookup(w, scope) : w.startsWith('"') ? JSON.parse(w) : /^\d+$/.test(w) ? Number(w) : (() => { throw new Error(`unknown word "${w}" in {{ ${expr} }}`) })()
    const [head, ...rest] = words
    if (head === undefined) throw new Error(`empty command in {{ ${expr} }}`)
    const f = FUNCS[head]
    if (f !== undefined) {
      piped = f(...rest.map(arg), ...(first ? [] : [piped]))
    } else {
      if (!first || rest.length > 0) throw new Error(`unknown function "${head}" in {{ ${expr} }}`)
      piped = arg(head)
    }
    first = false
  }
  return piped
}

function renderNodes (nodes: Node[], scope: Scope): string {
  return nodes.map(n => n.t === 'text' ? n.v : n.t === 'expr' ? text(evaluate(n.v, scope)) : renderNodes(truthy(evaluate(n.cond, scope)) ? n.then : n.else, scope)).join('')
}

function deepMerge (base: unknown, over: unknown): unknown {
  if (over === undefined) return base
  if (base === null || over === null || typeof base !== 'object' || typeof over !== 'object' || Array.isArray(base) || Array.isArray(over)) return over
  const out: Record<string, unknown> = { ...(base as Record<string, unknown>) }
  for (const [k, v] of Object.entries(over as Record<string, unknown>)) out[k] = deepMerge(out[k], v)
  return out
}

/** `helm template NAME CHART --namespace NS [--set ...]`, for this chart: every document of every template. */
async function renderChart (o: { name?: string, namespace?: string, values?: Record<string, unknown> } = {}): Promise<any[]> {
  const [chart] = await loadYaml(`${CHART}/Chart.yaml`)
  const [defaults] = await loadYaml(`${CHART}/values.yaml`)
  const scope: Scope = {
    Values: deepMerge(defaults, o.values),
    Release: { Name: o.name ?? 'pullmesh', Namespace: o.namespace ?? 'pullmesh', Service: 'Helm' },
    Chart: { Name: chart.name, Version: chart.version, AppVersion: chart.appVersion },
  }
  const dir = join(REPO_ROOT, CHART, 'templates')
  const docs: any[] = []
  for (const f of (await readdir(dir)).filter(f => /\.ya?ml$/.test(f)).sort()) {
    const out = renderNodes(parseTemplate(await readFile(join(dir, f), 'utf8'), f), scope)
    docs.push(...(await parseYaml(out, `${f} as rendered`)).filter(d => d !== null))
  }
  return docs
}

const byKind = (docs: any[]): any[] => [...docs].sort((a, b) => `${a.kind}/${a.metadata?.name}`.localeCompare(`${b.kind}/${b.metadata?.name}`))
const find = (docs: any[], kind: string): any => docs.find(d => d.kind === kind)
const mainContainer = (ds: any): any => ds.spec.template.spec.containers.find((c: any) => c.name === 'pullmesh')

// ------------------------------------------------------------ the tests

let work = ''
beforeAll(async () => { work = await mkdtemp(join(tmpdir(), 'pullmesh-helm-')) })
afterAll(async () => { await rm(work, { recursive: true, force: true }) })

describe('the renderer (a Go-template subset)', () => {
  it('renders values, if/else, pipes and Go whitespace trimming as helm does', () => {
    const scope = { Values: { a: 'x', on: true, off: '', list: [{ k: 1 }], n: { m: 'y' } }, Release: { Name: 'r' } }
    const r = (s: string): string => renderNodes(parseTemplate(s, 't'), scope)
    expect(r('a: {{ .Values.a }}')).toBe('a: x')
    expect(r('a: {{ .Values.a | quote }} {{ .Values.n.m | b64enc }}')).toBe('a: "x" eQ==')
    expect(r('x:\n  {{- if .Values.on }}\n  y: 1\n  {{- end }}\nz: 2')).toBe('x:\n  y: 1\nz: 2')
    expect(r('x:\n  {{- if .Values.off }}\n  y: 1\n  {{- end }}\nz: 2')).toBe('x:\nz: 2')
    expect(r('{{ if .Values.off }}a{{ else }}{{ .Release.Name }}-b{{ end }}')).toBe('r-b')
    expect(r('{{ if not .Values.off }}yes{{ end }}')).toBe('yes')
    expect(r('l: {{ toYaml .Values.list | nindent 2 }}')).toBe('l: \n  [{"k":1}]')
    expect(r('{{/* a comment */}}\nk: v')).toBe('\nk: v')
    expect(() => r('{{ .Values.missing }}')).toThrow(/no value/)
    expect(() => r('{{ range .Values.list }}{{ end }}')).toThrow(/outside the subset/)
  })
})

describe('deploy/helm/pullmesh', () => {
  it('renders, with the default values, exactly the plain manifests of deploy/kubernetes (less the Namespace)', async () => {
    const rendered = await renderChart()
    const plain = (await loadYaml(PLAIN)).filter(d => d !== null && d.kind !== 'Namespace')
    expect(byKind(rendered)).toEqual(byKind(plain))
    expect((await loadYaml(PLAIN)).find(d => d?.kind === 'Namespace')?.metadata.name).toBe('pullmesh')
    const [chart] = await loadYaml(`${CHART}/Chart.yaml`)
    expect(chart).toMatchObject({ apiVersion: 'v2', name: 'pullmesh', type: 'application' })
    expect(mainContainer(find(rendered, 'DaemonSet')).image).toBe(`pullmesh:${chart.appVersion}`)
  })

  it('discovers peers through a headless Service: --bootstrap-dns names it, ready or not, on the p2p port', async () => {
    for (const [name, namespace] of [['pullmesh', 'pullmesh'], ['cache', 'infra']] as const) {
      const docs = await renderChart({ name, namespace })
      const svc = find(docs, 'Service')
      const ds = find(docs, 'DaemonSet')
      expect(svc.spec.clusterIP).toBe('None')
      expect(svc.spec.publishNotReadyAddresses).toBe(true)
      expect(svc.metadata.namespace).toBe(namespace)
      expect(svc.spec.selector).toEqual(ds.spec.template.metadata.labels)
      const args = mainContainer(ds).args as string[]
      const dns = args[args.indexOf('--bootstrap-dns') + 1]
      expect(args).toContain('--bootstrap-dns')
      const p2p = svc.spec.ports.find((p: any) => p.name === 'p2p')
      expect(dns).toBe(`${svc.metadata.name}.${namespace}.svc.cluster.local:${p2p.port}`)
      expect(p2p.targetPort).toBe(mainContainer(ds).ports.find((p: any) => p.name === 'p2p').containerPort)
      const spec = ds.spec.template.spec
      // Pods resolve cluster names from the host network only with this DNS policy.
      expect([spec.hostNetwork, spec.dnsPolicy]).toEqual([true, 'ClusterFirstWithHostNet'])
    }
  })

  it('takes the mesh key from a Secret: the release\'s own by default, an existing one, or one created from a value', async () => {
    const keyPath = (ds: any): { secret: any, file: string } => {
      const c = mainContainer(ds)
      const file = c.env.find((e: any) => e.name === 'PULLMESH_MESH_KEY').value as string
      const mount = c.volumeMounts.find((m: any) => file.startsWith(m.mountPath + '/'))
      expect(mount?.readOnly, 'the key is mounted read-only').toBe(true)
      const vol = ds.spec.template.spec.volumes.find((v: any) => v.name === mount.name)
      expect(vol.secret.items).toEqual([{ key: 'mesh.key', path: file.slice(mount.mountPath.length + 1) }])
      return { secret: vol.secret, file }
    }
    // Default: the DaemonSet needs <release>-mesh-key, which the operator creates (the chart does not invent a key).
    const plain = await renderChart({ name: 'pm', namespace: 'ns1' })
    expect(keyPath(find(plain, 'DaemonSet')).secret.secretName).toBe('pm-mesh-key')
    expect(find(plain, 'Secret')).toBeUndefined()
    // An existing Secret.
    const existing = await renderChart({ values: { mesh: { existingSecret: 'corp-mesh-key' } } })
    expect(keyPath(find(existing, 'DaemonSet')).secret.secretName).toBe('corp-mesh-key')
    expect(find(existing, 'Secret')).toBeUndefined()
    // Created from a value: a key from `pullmesh keygen`, decoded from the rendered Secret, is the same key.
    const keyFile = join(work, 'mesh.key')
    await run(process.execPath, [DAEMON_ENTRY, 'keygen', keyFile], { timeoutMs: 30_000 })
    const key = await readFile(keyFile, 'utf8')
    const created = await renderChart({ values: { mesh: { key } } })
    const secret = find(created, 'Secret')
    const { secret: vol } = keyPath(find(created, 'DaemonSet'))
    expect(secret.metadata).toMatchObject({ name: vol.secretName, namespace: 'pullmesh' })
    const decoded = Buffer.from(secret.data['mesh.key'], 'base64')
    expect(Buffer.from(parseMeshKey(decoded))).toEqual(Buffer.from(parseMeshKey(Buffer.from(key))))
    // An existing Secret wins over a value.
    const both = await renderChart({ values: { mesh: { key, existingSecret: 'corp-mesh-key' } } })
    expect(find(both, 'Secret')).toBeUndefined()
  })

  it('puts upstreams, budget and mDNS in the ConfigMap, which the daemon\'s configuration accepts', async () => {
    const docs = await renderChart({ values: { upstreams: 'ghcr.io=https://ghcr.io', store: { maxSize: '100GiB', maxAge: '7d' }, mesh: { mdnsInterval: '2m', mdns: false } } })
    const cm = find(docs, 'ConfigMap')
    const ds = find(docs, 'DaemonSet')
    expect(mainContainer(ds).envFrom[0].configMapRef.name).toBe(cm.metadata.name)
    for (const v of Object.values(cm.data)) expect(typeof v, 'ConfigMap values are strings').toBe('string')
    const config = buildConfig(settingsFromEnv(cm.data), {})
    expect(config.upstreams.map(u => u.name)).toEqual(['ghcr.io'])
    expect(config.maxBytes).toBe(100 * 2 ** 30)
    expect(config.maxAgeMs).toBe(7 * 86_400_000)
    expect(config.mesh).toMatchObject({ mdns: false, mdnsIntervalMs: 120_000 })
    expect(config.dataDir).toBe('/var/lib/pullmesh')
    const defaults = buildConfig(settingsFromEnv(find(await renderChart(), 'ConfigMap').data), {})
    expect(defaults.mesh).toMatchObject({ mdns: true, mdnsIntervalMs: 60_000 })
  })

  it('configures containerd by default, and leaves it alone with containerd.configure=false; resources, tolerations, nodeSelector and the image follow the values', async () => {
    const on = find(await renderChart({ values: { containerd: { certsDir: '/var/lib/rancher/k3s/agent/etc/containerd/certs.d' } } }), 'DaemonSet').spec.template.spec
    const init = on.initContainers.find((c: any) => c.name === 'configure-containerd')
    const mount = init.volumeMounts[0]
    expect(on.volumes.find((v: any) => v.name === mount.name).hostPath.path).toBe('/var/lib/rancher/k3s/agent/etc/containerd/certs.d')
    expect(init.args).toEqual(['configure', 'containerd', '--dir', mount.mountPath, '--mirror', 'http://127.0.0.1:5000'])

    const docs = await renderChart({
      values: {
        containerd: { configure: false },
        image: { repository: 'registry.corp/pullmesh', tag: '9.9.9', pullPolicy: 'Always' },
        resources: { requests: { cpu: '1', memory: '2Gi' }, limits: { memory: '4Gi' } },
        tolerations: [],
        nodeSelector: { 'kubernetes.io/os': 'linux' },
        store: { dataDir: '/data/pullmesh' },
      },
    })
    const spec = find(docs, 'DaemonSet').spec.template.spec
    expect(spec.initContainers.map((c: any) => c.name)).toEqual(['data-dir-owner'])
    expect(spec.volumes.map((v: any) => v.name)).not.toContain('containerd-certs')
    expect(spec.tolerations).toBeUndefined()
    expect(spec.nodeSelector).toEqual({ 'kubernetes.io/os': 'linux' })
    const main = spec.containers[0]
    expect([main.image, main.imagePullPolicy]).toEqual(['registry.corp/pullmesh:9.9.9', 'Always'])
    // Values merge into the defaults, as helm's do (limits.cpu stays "2" unless set to null).
    expect(main.resources).toEqual({ requests: { cpu: '1', memory: '2Gi' }, limits: { cpu: '2', memory: '4Gi' } })
    expect(spec.volumes.find((v: any) => v.name === 'data').hostPath.path).toBe('/data/pullmesh')
    expect(main.volumeMounts.find((m: any) => m.name === 'data').mountPath).toBe('/data/pullmesh')
    expect(spec.initContainers[0].command).toEqual(['chown', '10001:10001', '/data/pullmesh'])
    expect(find(docs, 'ConfigMap').data.PULLMESH_DATA_DIR).toBe('/data/pullmesh')
  })
})
