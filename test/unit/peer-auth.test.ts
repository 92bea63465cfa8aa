// Mesh key parsing (the same 32 bytes whatever the file's line endings, and what libp2p's pnet accepts),
// the data-path verifier's replay cache, and the start-up warning for an open mesh.
import { describe, expect, it } from 'vitest'
import { preSharedKey } from '@libp2p/pnet'
import { buildConfig } from '../../src/config.js'
import { openMeshWarning } from '../../src/daemon.js'
import { generateMeshKey } from '../../src/mesh/index.js'
import { MeshKeyError, encodeMeshKey, parseMeshKey } from '../../src/mesh/psk.js'
import { createRequestVerifier, dataPathKey, signRequest } from '../../src/peer-protocol.js'

const env = { HOME: '/home/u' }

describe('mesh key files', () => {
  const lf = Buffer.from(generateMeshKey()).toString('utf8')
  const hex = lf.split('\n')[2]!

  it('gives the same key for LF, CRLF, CR, a trailing newline, a BOM, trailing blanks and upper-case hex', () => {
    const psk = parseMeshKey(lf)
    expect(Buffer.from(psk).toString('hex')).toBe(hex)
    for (const variant of [
      `${lf}\n`,
      lf.split('\n').join('\r\n'),
      `${lf.split('\n').join('\r\n')}\r\n`,
      lf.split('\n').join('\r'),
      `\uFEFF${lf}\n\n`,
      lf.split('\n').map(l => `${l} \t`).join('\n'),
      lf.replace(hex, hex.toUpperCase()),
    ]) expect(Buffer.from(parseMeshKey(Buffer.from(variant))).toString('hex')).toBe(hex)
  })

  it('hands libp2p pnet one canonical file, which it accepts', () => {
    for (const variant of [`${lf.split('\n').join('\r\n')}\r\n`, lf.replace(hex, hex.toUpperCase())]) {
      const canonical = encodeMeshKey(parseMeshKey(variant))
      expect(Buffer.from(canonical).toString('utf8')).toBe(lf)
      expect(() => preSharedKey({ psk: canonical })()).not.toThrow()
    }
  })

  it('refuses what is not a pnet v1 base16 key, without echoing it', () => {
    for (const bad of ['', 'nope', lf.replace('/base16/', '/base64/'), lf.replace('1.0.0', '2.0.0'), lf.slice(0, -1), `${lf}0`, `${lf}\nextra`, lf.replace(hex, `${hex.slice(0, 63)}g`)]) {
      expect(() => parseMeshKey(bad), JSON.stringify(bad)).toThrow(MeshKeyError)
      try { parseMeshKey(bad) } catch (e) { expect((e as Error).message).not.toContain(hex.slice(0, 16)) }
    }
  })

  it('the data-path key depends on the key bytes only', () => {
    const a = dataPathKey(parseMeshKey(lf))
    const b = dataPathKey(parseMeshKey(`${lf.split('\n').join('\r\n')}\r\n`))
    expect(a.equals(b)).toBe(true)
    expect(a.equals(dataPathKey(parseMeshKey(generateMeshKey())))).toBe(false)
  })
})

describe('data-path verifier', () => {
  const key = dataPathKey(parseMeshKey(generateMeshKey()))
  const req = { method: 'GET', url: '/pullmesh/v1/blobs/sha256:00' }

  it('keeps a bounded replay cache: full of live nonces, it refuses rather than forgets', () => {
    const v = createRequestVerifier(key, { self: 'me', maxNonces: 3 })
    const now = 1_000_000
    for (let i = 0; i < 3; i++) expect(v.verify(req, signRequest(key, { target: 'me', ...req }, now), now)).toEqual({ ok: true })
    expect(v.verify(req, signRequest(key, { target: 'me', ...req }, now), now)).toEqual({ ok: false, reason: 'busy' })
    // Once the window has passed twice, the old nonces are dropped (their signatures are expired anyway).
    const later = now + 60_001
    expect(v.verify(req, signRequest(key, { target: 'me', ...req }, later), later)).toEqual({ ok: true })
    expect(v.size()).toBe(1)
  })

  it('a nonce stays used for as long as its signature could be accepted', () => {
    const v = createRequestVerifier(key, { self: 'me' })
    const t = 1_000_000
    const h = signRequest(key, { target: 'me', ...req }, t + 30_000)
    expect(v.verify(req, h, t)).toEqual({ ok: true })
    expect(v.verify(req, h, t + 59_999)).toEqual({ ok: false, reason: 'replayed' })
    expect(v.verify(req, h, t + 60_001)).toEqual({ ok: false, reason: 'expired' })
  })

  it('tells a different key, a bad signature, another target and a malformed header apart', () => {
    const v = createRequestVerifier(key, { self: 'me' })
    const other = dataPathKey(parseMeshKey(generateMeshKey()))
    expect(v.verify(req, signRequest(other, { target: 'me', ...req }))).toEqual({ ok: false, reason: 'key' })
    expect(v.verify(req, signRequest(key, { target: 'you', ...req }))).toEqual({ ok: false, reason: 'signature' })
    expect(v.verify({ ...req, method: 'HEAD' }, signRequest(key, { target: 'me', ...req }))).toEqual({ ok: false, reason: 'signature' })
    expect(v.verify(req, undefined)).toEqual({ ok: false, reason: 'missing' })
    expect(v.verify(req, ['a', 'b'])).toEqual({ ok: false, reason: 'malformed' })
    expect(v.verify(req, `${Date.now()}.${'0'.repeat(64)}`)).toEqual({ ok: false, reason: 'malformed' })
  })
})

describe('open mesh warning', () => {
  it('warns once for a keyless mesh on all interfaces, and says how to close it', () => {
    const c = buildConfig({}, env, [], { ipv6: false })
    const w = openMeshWarning(c.mesh, false)
    expect(w).toContain('/ip4/0.0.0.0/tcp/4001')
    expect(w).toContain('0.0.0.0:5050 (data path)')
    const dual = openMeshWarning(buildConfig({}, env, [], { ipv6: true }).mesh, false)
    expect(dual).toContain('/ip6/::/tcp/4001')
    expect(w).toContain('pullmesh keygen FILE')
    expect(w).toContain('--mesh-key FILE')
    expect(openMeshWarning(c.mesh, true)).toBeUndefined()
    expect(openMeshWarning(buildConfig({ p2pListen: ['/ip6/::/tcp/4001'], peerListen: '10.0.0.5:5050' }, env).mesh, false)).toContain('/ip6/::/tcp/4001')
    expect(openMeshWarning(buildConfig({ p2pListen: ['/ip4/10.0.0.5/tcp/4001'], peerListen: '10.0.0.5:5050' }, env).mesh, false)).toBeUndefined()
  })
})

describe('data-path signing', () => {
  it('signs the URL as a WHATWG client sends it', () => {
    const key = dataPathKey(parseMeshKey(generateMeshKey()))
    const v = createRequestVerifier(key, { self: 'me' })
    const raw = '/pullmesh/v1/fetch/sha256:00?u=docker.io&repo=library/a b&x="<y>"'
    const u = new URL(raw, 'http://10.0.0.1:5050')
    const wire = u.pathname + u.search
    expect(wire).not.toBe(raw)
    expect(v.verify({ method: 'GET', url: wire }, signRequest(key, { target: 'me', method: 'GET', url: raw }))).toEqual({ ok: true })
  })
})
