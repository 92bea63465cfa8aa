import { describe, expect, it } from 'vitest'
import { backoffDelay, DEFAULT_BACKOFF, RedialTable, type BackoffPolicy } from '../../src/mesh/membership.js'

const P: BackoffPolicy = { firstMs: 250, factor: 2, maxMs: 20_000, jitter: 0.25 }
const mid = (): number => 0.5 // no jitter: the base delay
const lo = (): number => 0
const hi = (): number => 1

describe('backoffDelay', () => {
  it('doubles from firstMs and stops at maxMs', () => {
    const seq = Array.from({ length: 10 }, (_, i) => backoffDelay(i, P, mid))
    expect(seq).toEqual([250, 500, 1000, 2000, 4000, 8000, 16000, 20000, 20000, 20000])
    expect(backoffDelay(1000, P, mid)).toBe(20_000) // no overflow for huge attempt counts
  })

  it('jitter spreads each delay over [base·(1−j), base·(1+j)]', () => {
    expect(backoffDelay(0, P, lo)).toBe(188) // 250 · 0.75, rounded
    expect(backoffDelay(0, P, hi)).toBe(313)
    expect(backoffDelay(20, P, lo)).toBe(15_000)
    expect(backoffDelay(20, P, hi)).toBe(25_000)
    for (let i = 0; i < 200; i++) {
      const d = backoffDelay(3, P)
      expect(d).toBeGreaterThanOrEqual(1500)
      expect(d).toBeLessThanOrEqual(2500)
    }
  })

  it('treats bad attempts and out-of-range inputs safely', () => {
    expect(backoffDelay(-3, P, mid)).toBe(250)
    expect(backoffDelay(Number.NaN, P, mid)).toBe(250)
    expect(backoffDelay(0, { ...P, jitter: 5 }, lo)).toBe(0) // jitter clamped to 1
    expect(backoffDelay(0, P, () => 7)).toBe(313) // random clamped to [0, 1]
  })

  it('the default policy redials a peer that comes back within 25 s at worst', () => {
    expect(backoffDelay(100, DEFAULT_BACKOFF, hi)).toBeLessThanOrEqual(25_000)
    expect(backoffDelay(0, DEFAULT_BACKOFF, hi)).toBeLessThan(500)
  })
})

describe('RedialTable', () => {
  // 'm' sorts between 'a' and 'z': we are the larger id for 'a' and the smaller for 'z'.
  const table = (o: Partial<ConstructorParameters<typeof RedialTable>[0]> = {}): RedialTable =>
    new RedialTable({ self: 'm', policy: P, tieDelayMs: 400, sightingGapMs: 2_000, random: mid, ...o })

  it('a sighting dials at once if our id is smaller, after the tie delay if larger', () => {
    const t = table()
    t.seen('z', 1000)
    t.seen('a', 1000)
    expect(t.due(1000, 10)).toEqual(['z'])
    expect(t.due(1399, 10)).toEqual([])
    expect(t.due(1400, 10)).toEqual(['a'])
    t.seen('m', 1000) // ourselves: never tracked
    expect(t.get('m')).toBeUndefined()
  })

  it('after a disconnect: redial with growing delays until connected, then start over', () => {
    const t = table()
    t.connected('z', 0)
    expect(t.due(100_000, 10)).toEqual([]) // connected: nothing to dial
    t.disconnected('z', 1000)
    expect(t.due(1249, 10)).toEqual([])
    const times: number[] = []
    let now = 1250
    for (let i = 0; i < 8; i++) {
      const at = t.get('z')?.nextAt
      expect(at).toBeDefined()
      now = at as number
      expect(t.due(now, 10)).toEqual(['z'])
      expect(t.due(now, 10)).toEqual([]) // dialing: not handed out twice
      times.push(now)
      t.dialEnded('z', now, false)
    }
    const gaps = times.slice(1).map((x, i) => x - (times[i] as number))
    expect(gaps).toEqual([500, 1000, 2000, 4000, 8000, 16000, 20000])
    t.connected('z', now + 10)
    expect(t.get('z')?.attempts).toBe(0)
    t.disconnected('z', now + 20)
    expect(t.get('z')?.nextAt).toBe(now + 20 + 250) // back to the short first delay
  })

  it('the larger id also waits the tie delay before its first redial', () => {
    const t = table()
    t.connected('a', 0)
    t.disconnected('a', 1000)
    expect(t.get('a')?.nextAt).toBe(1000 + 250 + 400)
  })

  it('a sighting brings a long backoff forward, but not closer than sightingGapMs to the last attempt', () => {
    const t = table()
    t.connected('z', 0)
    t.disconnected('z', 0)
    let now = 0
    for (let i = 0; i < 6; i++) { now = t.get('z')?.nextAt as number; t.due(now, 10); t.dialEnded('z', now, false) }
    const pending = t.get('z')?.nextAt as number
    expect(pending - now).toBe(16_000)
    t.seen('z', now + 500)
    expect(t.get('z')?.nextAt).toBe(now + 2_000)
    t.seen('z', now + 5_000)
    expect(t.get('z')?.nextAt).toBe(now + 2_000) // never later than already planned
  })

  it('a peer that keeps failing gets no more sighting shortcuts after maxSightingShortcuts attempts', () => {
    const t = table({ maxSightingShortcuts: 3 })
    t.seen('z', 0)
    let now = 0
    for (let i = 0; i < 3; i++) { now = t.get('z')?.nextAt as number; t.due(now, 10); t.dialEnded('z', now, false) }
    const planned = t.get('z')?.nextAt as number
    expect(planned - now).toBe(2_000) // 250 · 2³
    t.seen('z', now + 100)
    expect(t.get('z')?.nextAt).toBe(planned) // backoff only: the sighting changes nothing
    t.connected('z', now + 200)
    t.disconnected('z', now + 300)
    expect(t.get('z')?.attempts).toBe(0) // a connection resets it
  })

  it('an mDNS query nudges pending redials of lost peers forward, never of strangers or exhausted peers', () => {
    const t = table({ maxSightingShortcuts: 3 })
    t.connected('z4', 0); t.disconnected('z4', 0)
    let now = 0
    for (let i = 0; i < 3; i++) { now = t.get('z4')?.nextAt as number; expect(t.due(now, 10)).toEqual(['z4']); t.dialEnded('z4', now, false) }
    const z4 = t.get('z4')?.nextAt as number // exhausted: 3 failed attempts
    const b = now
    t.connected('z1', b); t.disconnected('z1', b) // lost, due at b + 250
    t.connected('a', b); t.disconnected('a', b) // lost, we are the larger id: b + 650
    t.seen('z2', b) // never connected
    t.connected('z3', b) // connected: nothing to do
    expect(t.due(b + 250, 10)).toEqual(['z2', 'z1'])
    t.dialEnded('z1', b + 250, false) // next at b + 750
    t.dialEnded('z2', b + 250, false) // next at b + 750
    t.nudged(b + 300)
    expect(t.get('z1')?.nextAt).toBe(b + 500) // 250 ms after its last attempt
    expect(t.get('a')?.nextAt).toBe(b + 650) // already due before b + 300 + tie 400
    expect(t.get('z2')?.nextAt).toBe(b + 750)
    expect(t.get('z3')?.nextAt).toBeUndefined()
    expect(t.get('z4')?.nextAt).toBe(z4)
  })

  it('a dial that fails after the peer connected some other way schedules nothing', () => {
    const t = table()
    t.seen('z', 0)
    expect(t.due(0, 10)).toEqual(['z'])
    t.connected('z', 5) // the peer dialed us meanwhile
    t.dialEnded('z', 10, false)
    expect(t.get('z')?.nextAt).toBeUndefined()
    expect(t.nextDue()).toBeUndefined()
  })

  it('bounds dials per call, earliest due first', () => {
    const t = table()
    for (const id of ['z1', 'z2', 'z3', 'z4', 'z5']) t.seen(id, Number(id.slice(1)))
    expect(t.due(100, 2)).toEqual(['z1', 'z2'])
    expect(t.due(100, 0)).toEqual([])
    expect(t.due(100, 10)).toEqual(['z3', 'z4', 'z5'])
  })

  it('bounds the number of peers: the least recently seen idle, unpinned peer makes room', () => {
    const t = table({ maxPeers: 3 })
    t.seen('z1', 1, { pinned: true })
    t.seen('z2', 2)
    t.connected('z3', 3)
    t.seen('z4', 4) // evicts z2 (z1 pinned, z3 connected)
    expect(t.ids().sort()).toEqual(['z1', 'z3', 'z4'])
    expect(t.size).toBe(3)
    t.due(10, 10) // z1 and z4 are now dialing: nothing can be evicted
    t.seen('z5', 11)
    expect(t.get('z5')).toBeUndefined()
    expect(t.size).toBe(3)
  })

  it('forgets peers not seen for forgetAfterMs, never pinned or connected ones', () => {
    const t = table({ forgetAfterMs: 60_000 })
    t.seen('z1', 0, { pinned: true })
    t.seen('z2', 0)
    t.connected('z3', 0)
    t.seen('z4', 30_000)
    expect(t.expire(59_999)).toEqual([])
    expect(t.expire(60_000)).toEqual(['z2'])
    expect(t.ids().sort()).toEqual(['z1', 'z3', 'z4'])
    expect(t.expire(90_000)).toEqual(['z4'])
  })
})
