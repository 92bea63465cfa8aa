import { mkdtempSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { describe, expect, it } from 'vitest'
import { buildConfig, mergeSettings, parseDuration, parseHostPort, parseSize, settingsFromEnv, settingsFromFile } from '../../src/config.js'
import { ConfigError } from '../../src/errors.js'

const env = { HOME: '/home/u' }

describe('config', () => {
  it('has working defaults', () => {
    const c = buildConfig({}, env)
    expect(c.listen).toEqual({ host: '127.0.0.1', port: 5000 })
    expect(c.dataDir).toBe('/home/u/.local/share/pullmesh')
    expect(c.upstreams.map(u => `${u.name}=${u.url}`)).toEqual(['docker.io=https://registry-1.docker.io'])
    expect(c.defaultUpstream).toBe('docker.io')
    expect(c.tagTtlMs).toBe(300_000)
    expect(c.mesh.mdns).toBe(true)
    expect(Object.isFrozen(c) && Object.isFrozen(c.upstreams)).toBe(true)
  })
  it('listens for the mesh on IPv6 too by default on a dual-stack host; explicit addresses win', () => {
    const v4 = buildConfig({}, env, [], { ipv6: false })
    expect(v4.mesh.p2pListen).toEqual(['/ip4/0.0.0.0/tcp/4001'])
    expect(v4.mesh.peerListen).toEqual({ host: '0.0.0.0', port: 5050 })
    const dual = buildConfig({}, env, [], { ipv6: true })
    expect(dual.mesh.p2pListen).toEqual(['/ip4/0.0.0.0/tcp/4001', '/ip6/::/tcp/4001'])
    expect(dual.mesh.peerListen).toEqual({ host: '::', port: 5050 })
    const explicit = buildConfig({ p2pListen: ['/ip4/10.0.0.5/tcp/4001'], peerListen: '10.0.0.5:5050' }, env, [], { ipv6: true })
    expect(explicit.mesh.p2pListen).toEqual(['/ip4/10.0.0.5/tcp/4001'])
    expect(explicit.mesh.peerListen).toEqual({ host: '10.0.0.5', port: 5050 })
  })
  it('has fail-fast, drain and proxy defaults, and reads the proxy variables from the environment it is given', () => {
    const c = buildConfig({}, env)
    expect(c.upstreamTimeouts).toMatchObject({ deadlineMs: 10_000, breakerHoldMs: 15_000 })
    expect(c.shutdownGraceMs).toBe(10_000)
    expect(c.upstreams[0]!.proxy).toBeUndefined()
    const p = buildConfig({ upstream: ['a.io=https://a.io', 'b.io=https://b.io'], upstreamProxy: ['b.io=socks5://127.0.0.1:1080'] },
      { ...env, HTTPS_PROXY: 'http://proxy:3128', no_proxy: '.corp' })
    expect(p.upstreams[0]!.proxy).toEqual({ kind: 'env', httpsProxy: 'http://proxy:3128', noProxy: '.corp' })
    expect(p.upstreams[1]!.proxy).toEqual({ kind: 'url', url: 'socks5://127.0.0.1:1080' })
    expect(buildConfig({ upstreamHold: 'off', upstreamDeadline: '3s', shutdownGrace: '0' }, env).upstreamTimeouts).toMatchObject({ deadlineMs: 3000, breakerHoldMs: 0 })
    expect(settingsFromEnv({ PULLMESH_UPSTREAM_PROXY: 'a.io=http://p:1,b.io=direct' }).upstreamProxy).toEqual(['a.io=http://p:1', 'b.io=direct'])
  })
  it('checks the TLS pair: both files or neither, readable, a certificate and its key', () => {
    expect(() => buildConfig({ tlsCert: '/nonexistent/cert.pem' }, env)).toThrow(/give both/)
    expect(() => buildConfig({ tlsCert: '/nonexistent/c.pem', tlsKey: '/nonexistent/k.pem' }, env)).toThrow(/cannot read it \(ENOENT\)/)
    const dir = mkdtempSync(join(tmpdir(), 'pm-cfg-tls-'))
    writeFileSync(join(dir, 'c.pem'), 'not a certificate')
    writeFileSync(join(dir, 'k.pem'), 'not a key')
    expect(() => buildConfig({ tlsCert: join(dir, 'c.pem'), tlsKey: join(dir, 'k.pem') }, env)).toThrow(/not a PEM certificate/)
    expect(buildConfig({}, env).tls).toBeUndefined()
  })
  it('queries mDNS every 60 s by default; --mdns-interval, PULLMESH_MDNS_INTERVAL and the file set it, at least 1 s', () => {
    expect(buildConfig({}, env).mesh.mdnsIntervalMs).toBe(60_000)
    expect(buildConfig({ mdnsInterval: '2m' }, env).mesh.mdnsIntervalMs).toBe(120_000)
    expect(buildConfig(settingsFromEnv({ PULLMESH_MDNS_INTERVAL: '15s' }), env).mesh.mdnsIntervalMs).toBe(15_000)
    const dir = mkdtempSync(join(tmpdir(), 'pm-cfg-mdns-'))
    writeFileSync(join(dir, 'c.json'), JSON.stringify({ mdnsInterval: '90s' }))
    const problems: string[] = []
    expect(buildConfig(settingsFromFile(join(dir, 'c.json'), problems), env).mesh.mdnsIntervalMs).toBe(90_000)
    expect(problems).toEqual([])
    expect(() => buildConfig({ mdnsInterval: '100ms' }, env)).toThrow(/mdns-interval/)
    expect(() => buildConfig({ mdnsInterval: 'often' }, env)).toThrow(/mdns-interval/)
    expect(() => buildConfig({ mdnsInterval: '30d' }, env)).toThrow(/mdns-interval: at most 1d/)
  })
  it('uses XDG_DATA_HOME', () => {
    expect(buildConfig({}, { XDG_DATA_HOME: '/x' }).dataDir).toBe('/x/pullmesh')
  })
  it('reports every problem at once', () => {
    try {
      buildConfig({ listen: 'nope', tagTtl: 'soon', logLevel: 'loud', upstream: ['bad', 'ok.io=ftp://x'], peerListen: '1.2.3.4:99999', mdns: 'maybe' }, env)
      expect.unreachable()
    } catch (e) {
      expect(e).toBeInstanceOf(ConfigError)
      const p = (e as ConfigError).problems.join('\n')
      for (const word of ['listen', 'tag-ttl', 'log-level', '"bad"', 'ftp://x', 'peer-listen', 'mdns']) expect(p).toContain(word)
      expect((e as ConfigError).problems.length).toBeGreaterThanOrEqual(7)
    }
  })
  it('layers file < env < flags', () => {
    const dir = mkdtempSync(join(tmpdir(), 'pm-cfg-'))
    const file = join(dir, 'c.json')
    writeFileSync(file, JSON.stringify({ listen: '127.0.0.1:1', tagTtl: '1h', logLevel: 'warn', upstreams: { 'ghcr.io': 'https://ghcr.io' } }))
    const problems: string[] = []
    const merged = mergeSettings(settingsFromFile(file, problems), settingsFromEnv({ PULLMESH_TAG_TTL: '2m', PULLMESH_LOG_LEVEL: 'debug' }), { logLevel: 'error' })
    const c = buildConfig(merged, env, problems)
    expect(c.listen.port).toBe(1)
    expect(c.tagTtlMs).toBe(120_000)
    expect(c.logLevel).toBe('error')
    expect(c.upstreams.map(u => u.name)).toEqual(['ghcr.io'])
  })
  it('rejects unknown keys in the file and never echoes credential files', () => {
    const dir = mkdtempSync(join(tmpdir(), 'pm-cfg-'))
    const file = join(dir, 'c.json')
    writeFileSync(file, JSON.stringify({ listn: 'x' }))
    const problems: string[] = []
    settingsFromFile(file, problems)
    expect(problems.join()).toContain('listn')
    const creds = join(dir, 'creds.json')
    writeFileSync(creds, '{"docker.io": {"username": "u", "password": "s3cret"')
    try { buildConfig({ credentialsFile: creds }, env); expect.unreachable() } catch (e) {
      expect((e as Error).message).not.toContain('s3cret')
    }
    writeFileSync(creds, JSON.stringify({ 'docker.io': { username: 'u', password: 's3cret' } }))
    expect(buildConfig({ credentialsFile: creds }, env).upstreams[0]!.credentials).toEqual({ username: 'u', password: 's3cret' })
  })
  it('parses durations and host:port', () => {
    expect(parseDuration('250ms')).toBe(250)
    expect(parseDuration('90')).toBe(90_000)
    expect(parseDuration('1.5h')).toBe(5_400_000)
    expect(parseDuration('1 day')).toBeUndefined()
    expect(parseHostPort('[::1]:5000')).toEqual({ host: '::1', port: 5000 })
    expect(parseHostPort('localhost:0')).toEqual({ host: 'localhost', port: 0 })
    expect(parseHostPort('5000')).toBeUndefined()
    expect(parseSize('500MiB')).toBe(500 * 2 ** 20)
    expect(parseSize('2GB')).toBe(2e9)
    expect(parseSize('1.5TiB')).toBe(1.5 * 2 ** 40)
    expect(parseSize('12 parsecs')).toBeUndefined()
  })
  it('validates mesh settings, sizes and ages, never echoing a key', () => {
    const dir = mkdtempSync(join(tmpdir(), 'pm-cfg-'))
    const key = join(dir, 'mesh.key')
    writeFileSync(key, '/key/swarm/psk/1.0.0/\n/base16/\n' + 'ab'.repeat(32) + '\n')
    const ok = buildConfig({ meshKey: key, bootstrap: ['/ip4/10.0.0.5/tcp/4001/p2p/12D3KooWabc'], p2pListen: ['/ip4/0.0.0.0/tcp/4001'], maxSize: '50GiB', maxAge: 'off' }, env)
    expect(ok.mesh.meshKeyFile).toBe(key)
    expect(ok.maxBytes).toBe(50 * 2 ** 30)
    expect(ok.maxAgeMs).toBeUndefined()
    const bad = join(dir, 'bad.key')
    writeFileSync(bad, 'secret-material-not-a-key')
    try {
      buildConfig({ meshKey: bad, bootstrap: ['/ip4/10.0.0.5/tcp/4001'], maxSize: 'lots', maxAge: 'forever' }, env)
      expect.unreachable()
    } catch (e) {
      const p = (e as ConfigError).problems.join('\n')
      for (const word of ['mesh-key', 'bootstrap', 'max-size', 'max-age']) expect(p).toContain(word)
      expect(p).not.toContain('secret-material')
    }
  })

  it('content routing: both by default, a DHT deadline of 300 ms; env and flags override; bad values reported', () => {
    const c = buildConfig({}, env)
    expect(c.mesh.routing).toBe('both')
    expect(c.mesh.dhtDeadlineMs).toBe(300)
    const e = buildConfig(mergeSettings(settingsFromEnv({ PULLMESH_ROUTING: 'dht', PULLMESH_DHT_DEADLINE: '1s' }), {}), env)
    expect([e.mesh.routing, e.mesh.dhtDeadlineMs]).toEqual(['dht', 1000])
    expect(buildConfig({ routing: 'gossip' }, env).mesh.routing).toBe('gossip')
    try {
      buildConfig({ routing: 'flood', dhtDeadline: 'soon' }, env)
      expect.unreachable()
    } catch (err) {
      const p = (err as ConfigError).problems.join('\n')
      expect(p).toContain('routing: expected gossip, dht or both')
      expect(p).toContain('dht-deadline')
    }
  })

  it('content routing: --no-peer-exchange runs without the DHT (which trades peer addresses), and refuses to be combined with it', () => {
    expect(buildConfig({ peerExchange: false }, env).mesh.routing).toBe('gossip')
    expect(buildConfig({ peerExchange: 'false', routing: 'gossip' }, env).mesh.routing).toBe('gossip')
    for (const routing of ['dht', 'both']) {
      expect(() => buildConfig({ peerExchange: false, routing }, env)).toThrow(/with --no-peer-exchange use --routing gossip/)
    }
  })
})
