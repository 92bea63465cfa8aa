/**
 * A Docker/distribution token service for tests, for the real registry started by ./registry.ts.
 *
 * It issues ES256 JWTs whose header carries the signing certificate in `x5c`; distribution 2.8
 * (`registry/auth/token/token.go`) verifies that chain against `rootcertbundle`, then checks
 * `iss`, `aud` (= service), `exp`/`nbf` (60 s leeway) and the `access` claim. The key and the
 * self-signed certificate are generated with the `openssl` CLI in a mkdtemp directory.
 *
 * ```ts
 * const ts = await startTokenServer({ users: { alice: { password: 'pw' }, seeder: { password: 'pw', actions: ['pull', 'push'] } } })
 * const reg = await startRegistry({ auth: ts.registryAuth })
 * ...
 * await reg.close(); await ts.close()
 * ```
 */
import { execFile } from 'node:child_process'
import { X509Certificate, createPrivateKey, randomUUID, sign, type KeyObject } from 'node:crypto'
import { mkdtemp, readFile, rm } from 'node:fs/promises'
import { createServer } from 'node:http'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { promisify } from 'node:util'
import { listen, trackSockets } from './net.js'

const exec = promisify(execFile)

export interface TokenServerOptions {
  /** Basic-auth users and the actions each may get (default `['pull']`). */
  users?: Record<string, { password: string, actions?: string[] }>
  /** Actions granted without credentials; default none (anonymous requests get 401). */
  anonymousActions?: string[]
  /** Token lifetime in seconds, also sent as `expires_in`; default 300. */
  expiresIn?: number
  service?: string
  issuer?: string
}

/** What distribution's `auth: token:` config section needs. */
export interface RegistryTokenAuth { realm: string, service: string, issuer: string, rootcertbundle: string }

export interface TokenRequestRecord {
  /** The authenticated user, or undefined for anonymous. */
  user: string | undefined
  scopes: string[]
  status: number
}

export interface TokenServer {
  /** `http://127.0.0.1:PORT` */
  url: string
  /** `http://127.0.0.1:PORT/token` */
  realm: string
  service: string
  issuer: string
  /** Path of the PEM certificate to give the registry as `rootcertbundle`. */
  certPath: string
  registryAuth: RegistryTokenAuth
  /** Every token request, in order. */
  requests: TokenRequestRecord[]
  /** Mints a token directly, e.g. a push token for seeding: `mint('seeder', [{ type: 'repository', name, actions: ['pull','push'] }])`. */
  mint: (subject: string, access: Array<{ type: string, name: string, actions: string[] }>) => string
  close: () => Promise<void>
}

const b64url = (b: Buffer | string): string => Buffer.from(b).toString('base64url')

export async function startTokenServer (opts: TokenServerOptions = {}): Promise<TokenServer> {
  const dir = await mkdtemp(join(tmpdir(), 'pullmesh-token-'))
  const keyPath = join(dir, 'key.pem')
  const certPath = join(dir, 'cert.pem')
  try {
    await exec('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
      '-keyout', keyPath, '-out', certPath, '-days', '2', '-sha256', '-subj', '/CN=pullmesh-test-token-issuer'])
  } catch (e) {
    await rm(dir, { recursive: true, force: true })
    throw e
  }
  const key: KeyObject = createPrivateKey(await readFile(keyPath))
  const certDer = new X509Certificate(await readFile(certPath)).raw.toString('base64')
  const service = opts.service ?? 'pullmesh-test-registry'
  const issuer = opts.issuer ?? 'pullmesh-test-issuer'
  const expiresIn = opts.expiresIn ?? 300
  const users = opts.users ?? {}
  const requests: TokenRequestRecord[] = []

  function mint (subject: string, access: Array<{ type: string, name: string, actions: string[] }>): string {
    const now = Math.floor(Date.now() / 1000)
    const header = { typ: 'JWT', alg: 'ES256', x5c: [certDer] }
    const claims = { iss: issuer, sub: subject, aud: service, exp: now + expiresIn, nbf: now - 1, iat: now, jti: randomUUID(), access }
    const input = `${b64url(JSON.stringify(header))}.${b64url(JSON.stringify(claims))}`
    const sig = sign('sha256', Buffer.from(input), { key, dsaEncoding: 'ieee-p1363' })
    return `${input}.${b64url(sig)}`
  }

  const server = createServer((req, res) => {
    req.resume()
    const url = new URL(req.url ?? '/', 'http://127.0.0.1')
    const reply = (status: number, doc: unknown, headers: Record<string, string> = {}): void => {
      const body = Buffer.from(JSON.stringify(doc))
      res.writeHead(status, { 'content-type': 'application/json', 'content-length': body.length, ...headers })
      res.end(body)
    }
    const scopes = url.searchParams.getAll('scope').flatMap(s => s.split(' ')).filter(s => s !== '')
    if (url.pathname !== '/token' || req.method !== 'GET') { reply(404, { errors: [{ code: 'NOT_FOUND' }] }); return }

    let user: string | undefined
    let allowed: string[]
    const m = /^Basic\s+(\S+)$/i.exec(req.headers.authorization ?? '')
    if (m !== null) {
      const [name = '', ...rest] = Buffer.from(m[1]!, 'base64').toString('utf8').split(':')
      const u = users[name]
      if (u === undefined || u.password !== rest.join(':')) {
        requests.push({ user: name, scopes, status: 401 })
        reply(401, { errors: [{ code: 'UNAUTHORIZED', message: 'bad credentials' }] }, { 'www-authenticate': `Basic realm="${service}"` })
        return
      }
      user = name
      allowed = u.actions ?? ['pull']
    } else if (opts.anonymousActions !== undefined) {
      allowed = opts.anonymousActions
    } else {
      requests.push({ user: undefined, scopes, status: 401 })
      reply(401, { errors: [{ code: 'UNAUTHORIZED', message: 'credentials required' }] }, { 'www-authenticate': `Basic realm="${service}"` })
      return
    }
    const access = scopes.flatMap(s => {
      const parts = s.split(':')
      if (parts.length < 3) return []
      const type = parts[0]!
      const actions = parts[parts.length - 1]!.split(',').filter(a => allowed.includes(a))
      const name = parts.slice(1, -1).join(':')
      return actions.length > 0 ? [{ type, name, actions }] : []
    })
    requests.push({ user, scopes, status: 200 })
    const token = mint(user ?? 'anonymous', access)
    reply(200, { token, access_token: token, expires_in: expiresIn, issued_at: new Date().toISOString() })
  })
  const { closeServer } = trackSockets(server)
  const port = await listen(server)
  const url = `http://127.0.0.1:${port}`
  const realm = `${url}/token`
  return {
    url, realm, service, issuer, certPath, requests, mint,
    registryAuth: { realm, service, issuer, rootcertbundle: certPath },
    async close () {
      await closeServer()
      await rm(dir, { recursive: true, force: true })
    },
  }
}
