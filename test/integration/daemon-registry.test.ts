// The daemon in front of the real CNCF distribution registry with token auth: credentials from a file,
// the Bearer flow, verified pull-through, nothing secret in the logs, and content kept private.
import { createHash, randomBytes } from 'node:crypto'
import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Writable } from 'node:stream'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { buildConfig } from '../../src/config.js'
import { createDaemon, type Daemon } from '../../src/daemon.js'
import { createLogger } from '../../src/logger.js'
import { parseDigest } from '../../src/oci/digest.js'
import { MediaType } from '../../src/oci/media-types.js'
import { simpleRequest } from '../helpers/net.js'
import { pushBlob, pushManifest, startRegistry, type RegistryProcess } from '../helpers/registry.js'
import { startTokenServer, type TokenServer } from '../helpers/token-server.js'

const sha = (b: Buffer): string => `sha256:${createHash('sha256').update(b).digest('hex')}`
const repo = 'team/app'

describe('daemon against docker-registry with token auth', () => {
  let ts: TokenServer
  let reg: RegistryProcess
  let daemon: Daemon
  let dir: string
  const logLines: string[] = []
  let blob: Buffer
  let blobDigest: string
  let manifestDigest: string

  beforeAll(async () => {
    ts = await startTokenServer({ users: { puller: { password: 'pull-s3cret' }, seeder: { password: 'seed-pw', actions: ['pull', 'push'] } } })
    reg = await startRegistry({ auth: ts.registryAuth })
    const push = `Bearer ${ts.mint('seeder', [{ type: 'repository', name: repo, actions: ['pull', 'push'] }])}`
    blob = randomBytes(3 * 1024 * 1024 + 11)
    blobDigest = await pushBlob(reg.url, repo, blob, push)
    const config = Buffer.from('{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}')
    const configDigest = await pushBlob(reg.url, repo, config, push)
    manifestDigest = await pushManifest(reg.url, repo, 'v1', Buffer.from(JSON.stringify({
      schemaVersion: 2, mediaType: MediaType.ociManifest,
      config: { mediaType: 'application/vnd.oci.image.config.v1+json', digest: configDigest, size: config.length },
      layers: [{ mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip', digest: blobDigest, size: blob.length }],
    })), MediaType.ociManifest, push)
    ts.requests.length = 0

    dir = await mkdtemp(join(tmpdir(), 'pm-reg-'))
    const creds = join(dir, 'credentials.json')
    await writeFile(creds, JSON.stringify({ 'registry.test': { username: 'puller', password: 'pull-s3cret' } }), { mode: 0o600 })
    const sink = new Writable({ write (chunk: Buffer, _enc, cb) { logLines.push(...chunk.toString().split('\n').filter(Boolean)); cb() } })
    daemon = createDaemon(buildConfig({
      listen: '127.0.0.1:0', dataDir: join(dir, 'data'), upstream: [`registry.test=${reg.url}`], credentialsFile: creds, mesh: false, logLevel: 'debug',
    }, {}), { logger: createLogger('debug', sink) })
    await daemon.start()
  })

  afterAll(async () => {
    await daemon?.stop()
    await reg?.close()
    await ts?.close()
    if (dir !== undefined) await rm(dir, { recursive: true, force: true })
  })

  it('pulls a tag, its manifest and blob through the Bearer flow, verified, with one token per scope', async () => {
    const m = await simpleRequest(`${daemon.url()}/v2/registry.test/${repo}/manifests/v1`)
    expect(m.status).toBe(200)
    expect(m.headers['docker-content-digest']).toBe(manifestDigest)
    const b = await simpleRequest(`${daemon.url()}/v2/registry.test/${repo}/blobs/${blobDigest}`)
    expect(b.status).toBe(200)
    expect(sha(b.body)).toBe(blobDigest)
    const r = await simpleRequest(`${daemon.url()}/v2/registry.test/${repo}/blobs/${blobDigest}`, { headers: { range: 'bytes=100-199' } })
    expect(r.status).toBe(206)
    expect(r.body.equals(blob.subarray(100, 200))).toBe(true)
    expect(ts.requests.length).toBe(1)
    expect(reg.logs()).toMatch(new RegExp(`GET /v2/${repo}/blobs/${blobDigest}`))
  })

  it('never logs the password or a token, and keeps credentialed content private', async () => {
    const all = logLines.join('\n')
    expect(all).toContain('registry.test')
    expect(all).not.toContain('pull-s3cret')
    expect(all).not.toMatch(/Bearer [A-Za-z0-9._-]{20,}/)
    expect(all).not.toMatch(/"authorization":"(?!\[redacted\])/i)
    await expect.poll(async () => (await daemon.store.stat(parseDigest(blobDigest)))?.private).toBe(true)
  })
})
