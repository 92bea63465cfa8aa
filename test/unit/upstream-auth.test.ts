import { errors as undiciErrors } from 'undici'
import { describe, expect, it } from 'vitest'
import { UpstreamDeniedError, UpstreamProtocolError, UpstreamUnavailableError } from '../../src/errors.js'
import { TokenCache, basicAuthorization, parseTokenResponse, parseWwwAuthenticate, pullScope } from '../../src/upstream/auth.js'
import { backoff, parseContentRange } from '../../src/upstream/client.js'
import { isRetryable, toUpstreamError } from '../../src/upstream/map-error.js'

describe('parseWwwAuthenticate', () => {
  it('parses a Docker Hub bearer challenge', () => {
    const c = parseWwwAuthenticate('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull"')
    expect(c).toEqual([{ scheme: 'bearer', params: { realm: 'https://auth.docker.io/token', service: 'registry.docker.io', scope: 'repository:library/alpine:pull' } }])
  })

  it('handles case, spaces, unquoted values, escapes and commas inside quotes', () => {
    const c = parseWwwAuthenticate('BEARER  Realm = "http://x/token?a=1,b=2" , service=reg, scope="repository:a/b:pull,push", error="say \\"hi\\""')
    expect(c).toHaveLength(1)
    expect(c[0]!.scheme).toBe('bearer')
    expect(c[0]!.params).toEqual({ realm: 'http://x/token?a=1,b=2', service: 'reg', scope: 'repository:a/b:pull,push', error: 'say "hi"' })
  })

  it('returns several challenges, from one header or several', () => {
    expect(parseWwwAuthenticate('Basic realm="Registry Realm", Bearer realm="http://t/token",service="s"').map(c => c.scheme)).toEqual(['basic', 'bearer'])
    expect(parseWwwAuthenticate(['Negotiate abc==', 'Basic realm="r"'])).toEqual([
      { scheme: 'negotiate', params: {} }, { scheme: 'basic', params: { realm: 'r' } },
    ])
  })

  it('never throws on garbage', () => {
    for (const h of ['', '=', ',,,', 'Bearer realm="unterminated', 'Bearer realm=', '"quoted"', '\u0000\u00ff']) {
      expect(() => parseWwwAuthenticate(h)).not.toThrow()
    }
    expect(parseWwwAuthenticate(undefined)).toEqual([])
  })
})

describe('token responses', () => {
  it('accepts token or access_token and defaults expires_in to 60 s', () => {
    expect(parseTokenResponse({ token: 'a', expires_in: 300 })).toEqual({ token: 'a', expiresInS: 300 })
    expect(parseTokenResponse({ access_token: 'b' })).toEqual({ token: 'b', expiresInS: 60 })
    expect(parseTokenResponse({ token: '', access_token: 'c', expires_in: -5 })).toEqual({ token: 'c', expiresInS: 60 })
    expect(parseTokenResponse({ token: 'd', expires_in: '120' })).toEqual({ token: 'd', expiresInS: 120 })
    expect(parseTokenResponse({})).toBeUndefined()
    expect(parseTokenResponse(null)).toBeUndefined()
    expect(parseTokenResponse('token')).toBeUndefined()
  })

  it('builds pull scopes and basic credentials', () => {
    expect(pullScope('library/alpine')).toBe('repository:library/alpine:pull')
    expect(basicAuthorization({ username: 'u', password: 'p:w' })).toBe(`Basic ${Buffer.from('u:p:w').toString('base64')}`)
  })
})

describe('TokenCache', () => {
  it('keeps a token per scope until shortly before it expires', () => {
    let now = 1_000_000
    const cache = new TokenCache({ now: () => now })
    cache.set('repository:a:pull', { token: 'ta', expiresInS: 60 })
    cache.set('repository:b:pull', { token: 'tb', expiresInS: 300 })
    expect(cache.get('repository:a:pull')).toBe('ta')
    expect(cache.get('repository:c:pull')).toBeUndefined()
    now += 47_000 // 60 s lifetime, 12 s margin
    expect(cache.get('repository:a:pull')).toBe('ta')
    now += 1_000
    expect(cache.get('repository:a:pull')).toBeUndefined()
    expect(cache.get('repository:b:pull')).toBe('tb')
    now += 300_000 - 48_000 - 30_000 // 300 s lifetime, margin capped at 30 s
    expect(cache.get('repository:b:pull')).toBeUndefined()
  })

  it('replaces, deletes, and evicts the oldest scope past its size limit', () => {
    const cache = new TokenCache({ maxEntries: 2 })
    cache.set('s1', { token: '1', expiresInS: 60 })
    cache.set('s2', { token: '2', expiresInS: 60 })
    cache.set('s1', { token: '1b', expiresInS: 60 })
    cache.set('s3', { token: '3', expiresInS: 60 })
    expect(cache.size).toBe(2)
    expect(cache.get('s2')).toBeUndefined()
    expect(cache.get('s1')).toBe('1b')
    cache.delete('s1')
    expect(cache.get('s1')).toBeUndefined()
    cache.clear()
    expect(cache.size).toBe(0)
  })
})

describe('error mapping', () => {
  it('maps undici and socket errors to ours', () => {
    const cases: Array<[unknown, new (...a: never[]) => Error]> = [
      [new undiciErrors.ConnectTimeoutError(), UpstreamUnavailableError],
      [new undiciErrors.HeadersTimeoutError(), UpstreamUnavailableError],
      [new undiciErrors.BodyTimeoutError(), UpstreamUnavailableError],
      [new undiciErrors.SocketError('other side closed'), UpstreamUnavailableError],
      [Object.assign(new Error('connect ECONNREFUSED'), { code: 'ECONNREFUSED' }), UpstreamUnavailableError],
      [new undiciErrors.ResponseContentLengthMismatchError(), UpstreamProtocolError],
      [Object.assign(new Error('Invalid header'), { code: 'HPE_INVALID_HEADER_TOKEN' }), UpstreamProtocolError],
      [new Error('something odd'), UpstreamUnavailableError],
      ['a string', UpstreamUnavailableError],
    ]
    for (const [input, cls] of cases) {
      const out = toUpstreamError(input, 'up')
      expect(out).toBeInstanceOf(cls)
      expect(out.constructor.name.startsWith('Upstream')).toBe(true)
      expect((out as UpstreamUnavailableError).upstream).toBe('up')
    }
  })

  it('passes our errors through and returns the caller abort reason', () => {
    const denied = new UpstreamDeniedError('up', 403)
    expect(toUpstreamError(denied, 'up')).toBe(denied)
    const ac = new AbortController()
    const reason = new Error('client went away')
    ac.abort(reason)
    expect(toUpstreamError(new undiciErrors.RequestAbortedError(), 'up', ac.signal)).toBe(reason)
  })

  it('retries only unavailability', () => {
    expect(isRetryable(new UpstreamUnavailableError('up', 'x'))).toBe(true)
    expect(isRetryable(new UpstreamDeniedError('up', 401))).toBe(false)
    expect(isRetryable(new UpstreamProtocolError('up', 'x'))).toBe(false)
  })
})

describe('client helpers', () => {
  it('backs off exponentially with jitter, capped', () => {
    for (let i = 0; i < 50; i++) {
      const d1 = backoff(100, 1); const d3 = backoff(100, 3); const big = backoff(100, 30)
      expect(d1).toBeGreaterThanOrEqual(50); expect(d1).toBeLessThanOrEqual(100)
      expect(d3).toBeGreaterThanOrEqual(200); expect(d3).toBeLessThanOrEqual(400)
      expect(big).toBeLessThanOrEqual(10_000)
    }
  })

  it('parses Content-Range', () => {
    expect(parseContentRange('bytes 0-9/100')).toEqual({ start: 0, end: 9, size: 100 })
    expect(parseContentRange('bytes 0-9/*')).toBeUndefined()
    expect(parseContentRange('bytes 9-0/100')).toBeUndefined()
    expect(parseContentRange('bytes 0-100/100')).toBeUndefined()
    expect(parseContentRange(undefined)).toBeUndefined()
  })
})
