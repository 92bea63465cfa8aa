import { describe, expect, it } from 'vitest'
import { KeyedLock, SerialQueue } from '../../src/store/keyed-lock.js'

const tick = async (ms = 1): Promise<void> => new Promise(resolve => setTimeout(resolve, ms))

describe('KeyedLock', () => {
  it('runs sections for one key one at a time, in order, and other keys concurrently', async () => {
    const lock = new KeyedLock<string>()
    const log: string[] = []
    const section = (key: string, id: string) => lock.run(key, async () => {
      log.push(`${id}+`); await tick(5); log.push(`${id}-`); return id
    })
    const results = await Promise.all([section('a', 'a1'), section('a', 'a2'), section('b', 'b1')])
    expect(results).toEqual(['a1', 'a2', 'b1'])
    expect(log.indexOf('a1-')).toBeLessThan(log.indexOf('a2+'))
    expect(log.indexOf('b1+')).toBeLessThan(log.indexOf('a1-'))
  })

  it('releases the key when a section throws, and idle() waits for everything', async () => {
    const lock = new KeyedLock<string>()
    await expect(lock.run('k', async () => { throw new Error('boom') })).rejects.toThrow('boom')
    let done = false
    void lock.run('k', async () => { await tick(5); done = true })
    await lock.idle()
    expect(done).toBe(true)
  })
})

describe('SerialQueue', () => {
  it('runs tasks in order and keeps going after a failure', async () => {
    const q = new SerialQueue()
    const log: number[] = []
    const a = q.run(async () => { await tick(5); log.push(1) })
    const b = q.run(async () => { throw new Error('x') })
    const c = q.run(async () => { log.push(3) })
    await a; await expect(b).rejects.toThrow('x'); await c
    expect(log).toEqual([1, 3])
  })
})
