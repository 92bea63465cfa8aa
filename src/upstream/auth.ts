// Registry authentication helpers: WWW-Authenticate parsing, token responses and a per-scope
// token cache. Pure logic, no I/O, so that it can be unit tested with a fake clock.
import type { RepoName } from '../oci/reference.js'

/** One challenge from a `WWW-Authenticate` header. `scheme` is lower-cased, param names too. */
export interface AuthChallenge {
  scheme: string
  params: Record<string, string>
}

const TOKEN_CHAR = /[!#$%&'*+.^_`|~0-9A-Za-z-]/

/**
 * Parses a `WWW-Authenticate` header (RFC 9110 §11.6.1) into its challenges, e.g.
 * `Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull"`.
 * Several headers, or several challenges in one header, are all returned. Malformed input never throws.
 */
export function parseWwwAuthenticate (header: string | string[] | undefined): AuthChallenge[] {
  if (header === undefined) return []
  const text = Array.isArray(header) ? header.join(', ') : header
  const out: AuthChallenge[] = []
  let current: AuthChallenge | undefined
  let i = 0
  const n = text.length
  const skip = (chars: string): void => { while (i < n && chars.includes(text[i]!)) i++ }
  const readToken = (): string => {
    const start = i
    while (i < n && TOKEN_CHAR.test(text[i]!)) i++
    return text.slice(start, i)
  }
  while (i < n) {
    skip(' \t,')
    if (i >= n) break
    const token = readToken()
    if (token === '') { i++; continue } // garbage character: step over it
    skip(' \t')
    if (text[i] === '=' && current !== undefined && text[i + 1] !== '=') {
      // auth-param: name = token / quoted-string
      i++
      skip(' \t')
      let value = ''
      if (text[i] === '"') {
        i++
        while (i < n && text[i] !== '"') {
          if (text[i] === '\\' && i + 1 < n) i++
          value += text[i]
          i++
        }
        i++ // closing quote
      } else {
        const start = i
        while (i < n && text[i] !== ',' && text[i] !== ' ' && text[i] !== '\t') i++
        value = text.slice(start, i)
      }
      current.params[token.toLowerCase()] = value
    } else if (text[i] === '=') {
      // token68 after a scheme (e.g. `Negotiate abc==`): keep it whole, it carries no params we use
      while (i < n && text[i] === '=') i++
    } else {
      current = { scheme: token.toLowerCase(), params: {} }
      out.push(current)
    }
  }
  return out
}

/** The scope pullmesh asks for: read-only access to one repository. */
export function pullScope (repo: RepoName | string): string {
  return `repository:${repo}:pull`
}

/** Token lifetime when the token service names none (the distribution token spec's default). */
export const DEFAULT_TOKEN_LIFETIME_S = 60

export interface TokenGrant { token: string, expiresInS: number }

/**
 * Reads a token service answer: `token` or `access_token` (the OAuth2 name), `expires_in` in seconds
 * (default 60). Returns undefined when no usable token is present.
 */
export function parseTokenResponse (doc: unknown): TokenGrant | undefined {
  if (typeof doc !== 'object' || doc === null) return undefined
  const d = doc as { token?: unknown, access_token?: unknown, expires_in?: unknown }
  const token = typeof d.token === 'string' && d.token !== ''
    ? d.token
    : typeof d.access_token === 'string' && d.access_token !== '' ? d.access_token : undefined
  if (token === undefined) return undefined
  const exp = typeof d.expires_in === 'number' ? d.expires_in : Number(d.expires_in)
  return { token, expiresInS: Number.isFinite(exp) && exp > 0 ? exp : DEFAULT_TOKEN_LIFETIME_S }
}

export interface TokenCacheInit {
  /** Clock in ms; injectable for tests. */
  now?: () => number
  /** Most scopes kept; the oldest entry goes first. */
  maxEntries?: number
}

/**
 * Bearer tokens per scope, each kept until shortly before it expires: a fifth of its lifetime early,
 * at most 30 s early, so that a token is never sent in its last seconds.
 */
export class TokenCache {
  readonly #now: () => number
  readonly #max: number
  readonly #entries = new Map<string, { token: string, usableUntil: number }>()

  constructor (init: TokenCacheInit = {}) {
    this.#now = init.now ?? Date.now
    this.#max = init.maxEntries ?? 1000
  }

  get (scope: string): string | undefined {
    const e = this.#entries.get(scope)
    if (e === undefined) return undefined
    if (this.#now() >= e.usableUntil) {
      this.#entries.delete(scope)
      return undefined
    }
    return e.token
  }

  set (scope: string, grant: TokenGrant): void {
    const lifetimeMs = grant.expiresInS * 1000
    const margin = Math.min(30_000, lifetimeMs / 5)
    this.#entries.delete(scope)
    this.#entries.set(scope, { token: grant.token, usableUntil: this.#now() + lifetimeMs - margin })
    while (this.#entries.size > this.#max) {
      const oldest = this.#entries.keys().next()
      if (oldest.done === true) break
      this.#entries.delete(oldest.value)
    }
  }

  delete (scope: string): void { this.#entries.delete(scope) }
  clear (): void { this.#entries.clear() }
  get size (): number { return this.#entries.size }
}

/** `Authorization` value for HTTP basic credentials. */
export function basicAuthorization (c: { username: string, password: string }): string {
  return `Basic ${Buffer.from(`${c.username}:${c.password}`, 'utf8').toString('base64')}`
}
