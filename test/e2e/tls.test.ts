// TLS on the client API: pullmesh serves HTTPS with a certificate from a CA made here, the real skopeo
// and containerd pull through it verifying that CA (no insecure settings), and SIGHUP makes the daemon
// serve a renewed certificate without a restart.
import { X509Certificate } from 'node:crypto'
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises'
import { connect } from 'node:tls'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { startContainerd, type Containerd } from '../helpers/containerd.js'
import { startDaemon, type DaemonProcess } from '../helpers/daemon-process.js'
import { requireBinaries, requireRoot, run, waitFor } from '../helpers/exec.js'
import { allDigests, buildImage, pushImage, verifySkopeoDir, type BuiltImage } from '../helpers/images.js'
import { startRegistry, type RegistryProcess } from '../helpers/registry.js'
import { upstreamAlias } from './support.js'

let work = ''
let pki = ''
let reg: RegistryProcess | undefined
let daemon: DaemonProcess | undefined
let ctrd: Containerd | undefined
let img: BuiltImage | undefined

/** A leaf certificate for 127.0.0.1 signed by the test CA, written to `<name>.crt` / `<name>.key`. */
async function issueLeaf (name: string): Promise<{ crt: string, key: string }> {
  const key = join(pki, `${name}.key`)
  const csr = join(pki, `${name}.csr`)
  const crt = join(pki, `${name}.crt`)
  const ext = join(pki, `${name}.ext`)
  await writeFile(ext, 'subjectAltName=IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n')
  await run('openssl', ['req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', key, '-out', csr, '-subj', `/CN=pullmesh ${name}`])
  await run('openssl', ['x509', '-req', '-in', csr, '-CA', join(pki, 'ca.crt'), '-CAkey', join(pki, 'ca.key'), '-CAcreateserial', '-out', crt, '-days', '2', '-extfile', ext])
  return { crt, key }
}

/** The serial number of the certificate the daemon presents to a new connection. */
async function servedSerial (port: number): Promise<string> {
  return await new Promise((resolve, reject) => {
    const s = connect({ host: '127.0.0.1', port, ca: [], rejectUnauthorized: false }, () => {
      const serial = s.getPeerX509Certificate()?.serialNumber ?? ''
      s.destroy()
      resolve(serial)
    })
    s.on('error', reject)
  })
}

describe('TLS on the client API', () => {
  beforeAll(async () => {
    requireRoot()
    requireBinaries('openssl', 'skopeo', 'containerd', 'ctr')
    work = await mkdtemp(join(tmpdir(), 'pm-e2e-tls-'))
    pki = join(work, 'pki')
    await mkdir(pki)
    await run('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
      '-keyout', join(pki, 'ca.key'), '-out', join(pki, 'ca.crt'), '-days', '2', '-subj', '/CN=pullmesh test CA',
      '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign'])
    const leaf = await issueLeaf('server')
    // What the daemon is given: files that a renewal overwrites in place.
    await writeFile(join(pki, 'live.crt'), await readFile(leaf.crt))
    await writeFile(join(pki, 'live.key'), await readFile(leaf.key))

    reg = await startRegistry()
    img = await buildImage({ layers: 2, layerBytes: 512 * 1024, dir: work })
    await pushImage(img.layoutDir, `${reg.host}/library/tls:1`)
    daemon = await startDaemon({
      dataDir: join(work, 'data'),
      upstreams: { [reg.host]: reg.url, [upstreamAlias(reg.port)]: reg.url },
      extraArgs: ['--tls-cert', join(pki, 'live.crt'), '--tls-key', join(pki, 'live.key')],
    })
    ctrd = await startContainerd()
  }, 180_000)

  afterAll(async () => {
    await ctrd?.stop()
    await daemon?.stop()
    await reg?.close()
    await img?.cleanup()
    if (work !== '') await rm(work, { recursive: true, force: true })
  }, 60_000)

  it('serves HTTPS that skopeo verifies against the CA (and refuses without it)', async () => {
    const d = daemon!
    expect(d.url.startsWith('https://')).toBe(true)
    const certDir = join(work, 'skopeo-certs')
    await mkdir(certDir, { recursive: true })
    await writeFile(join(certDir, 'ca.crt'), await readFile(join(pki, 'ca.crt')))
    const src = `docker://${d.host}/${upstreamAlias(reg!.port)}/library/tls:1`
    const out = join(work, 'skopeo-out')
    await run('skopeo', ['copy', '--quiet', '--src-cert-dir', certDir, src, `dir:${out}`], { timeoutMs: 120_000 })
    await verifySkopeoDir(out, img!)
    const refused = await run('skopeo', ['inspect', '--raw', src], { allowFailure: true, timeoutMs: 60_000 })
    expect(refused.code).not.toBe(0)
    expect(refused.stderr).toMatch(/certificate|x509/i)
  }, 150_000)

  it('lets containerd pull through it with the CA named in hosts.toml', async () => {
    const d = daemon!
    const r = reg!
    const hostsDir = join(work, 'certs.d')
    await mkdir(join(hostsDir, r.host), { recursive: true })
    await writeFile(join(hostsDir, r.host, 'hosts.toml'), [
      `server = "${r.url}"`, '',
      `[host."${d.url}"]`, '  capabilities = ["pull", "resolve"]', `  ca = "${join(pki, 'ca.crt')}"`, '',
    ].join('\n'))
    await ctrd!.pull(`${r.host}/library/tls:1`, { hostsDir, plainHttp: false, timeoutMs: 120_000 })
    const got = new Set(await ctrd!.verifyContentStore())
    for (const dg of allDigests(img!)) expect(got.has(dg), dg).toBe(true)
    // The mirror answered (over TLS); containerd did not fall back to the registry.
    const served = d.requests().filter(q => q.url.includes('/library/tls/') && q.statusCode === 200)
    expect(served.some(q => q.url.includes('/blobs/'))).toBe(true)
  }, 150_000)

  it('serves a renewed certificate after SIGHUP, without a restart', async () => {
    const d = daemon!
    const before = await servedSerial(d.port)
    const renewed = await issueLeaf('renewed')
    const want = new X509Certificate(await readFile(renewed.crt)).serialNumber
    expect(want).not.toBe(before)
    await writeFile(join(pki, 'live.crt'), await readFile(renewed.crt))
    await writeFile(join(pki, 'live.key'), await readFile(renewed.key))
    process.kill(d.pid, 'SIGHUP')
    await waitFor(async () => (await servedSerial(d.port)) === want ? true : undefined, { timeoutMs: 10_000, what: 'the renewed certificate' })
    expect(d.exited()).toBe(false)
    // A broken pair is refused on reload; the renewed certificate stays in use.
    await writeFile(join(pki, 'live.key'), 'not a key')
    process.kill(d.pid, 'SIGHUP')
    await waitFor(() => d.logs().some(l => l.includes('TLS reload failed')) ? true : undefined, { timeoutMs: 10_000, what: 'the failed reload in the log' })
    expect(await servedSerial(d.port)).toBe(want)
    const certDir = join(work, 'skopeo-certs')
    const out = await run('skopeo', ['inspect', '--raw', '--cert-dir', certDir, `docker://${d.host}/${upstreamAlias(reg!.port)}/library/tls:1`], { timeoutMs: 60_000 })
    expect(JSON.parse(out.stdout)).toHaveProperty('schemaVersion', 2)
  }, 60_000)
})
