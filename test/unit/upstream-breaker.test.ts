import { describe, expect, it } from 'vitest'
import { CircuitBreaker, UpstreamCircuitOpenError } from '../../src/upstream/breaker.js'
import { UpstreamUnavailableError } from '../../src/errors.js'

function clocked (holdMs: number): { b: CircuitBreaker, at: (ms: number) => void } {
  let t = 1_000_000
  return { b: new CircuitBreaker({ upstream: 'u.test', holdMs, now: () => t }), at: ms => { t = 1_000_000 + ms } }
}

describe('CircuitBreaker', () => {
  it('stays closed while the upstream answers, whatever the status', () => {
    const { b } = clocked(15_000)
    for (let i = 0; i < 3; i++) b.acquire().reachable()
    expect(b.state).toBe('closed')
    expect(b.available).toBe(true)
  })

  it('opens on an unreachable upstream and fails fast with Retry-After until the hold ends', () => {
    const { b, at } = clocked(15_000)
    b.acquire().unreachable('connect timeout')
    expect(b.state).toBe('open')
    at(1_000)
    try { b.acquire(); expect.unreachable() } catch (e) {
      expect(e).toBeInstanceOf(UpstreamCircuitOpenError)
      expect(e).toBeInstanceOf(UpstreamUnavailableError) // stale-if-error and the 503 mapping still apply
      expect((e as UpstreamCircuitOpenError).retryAfterS).toBe(14)
      expect((e as Error).message).toContain('connect timeout')
    }
  })

  it('half-opens after the hold: one probe, others fail fast until it ends', () => {
    const { b, at } = clocked(1_000)
    b.acquire().unreachable('timeout')
    at(1_000)
    expect(b.state).toBe('half-open')
    const probe = b.acquire()
    expect(() => b.acquire()).toThrow(UpstreamCircuitOpenError)
    probe.unreachable('timeout again')
    expect(b.state).toBe('open')
    at(2_500)
    const probe2 = b.acquire()
    expect(() => b.acquire()).toThrow(UpstreamCircuitOpenError)
    probe2.reachable()
    expect(b.state).toBe('closed')
    b.acquire().reachable()
  })

  it('lets the next request probe when a probe ends without a verdict (its caller gave up)', () => {
    const { b, at } = clocked(1_000)
    b.acquire().unreachable('timeout')
    at(1_500)
    const p = b.acquire()
    p.release()
    p.reachable() // a second report is ignored
    expect(b.state).toBe('half-open')
    b.acquire().reachable()
    expect(b.state).toBe('closed')
  })

  it('never opens with a hold of 0', () => {
    const { b } = clocked(0)
    b.acquire().unreachable('timeout')
    expect(b.state).toBe('closed')
    b.acquire().reachable()
  })
})
