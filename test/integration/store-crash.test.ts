// SIGKILL a process that is writing through the store at random moments, then check that the
// cache on disk is consistent: before reconcile, every index entry points at a complete file that
// verifies; after reconcile, no temp file and no unindexed file remains.
import { spawn, type ChildProcess } from 'node:child_process'
import { randomInt } from 'node:crypto'
import { fileURLToPath } from 'node:url'
import { afterEach, beforeEach, describe, expect, it } from 'vitest'
import { createFsStore } from '../../src/store/fs-store.js'
import {
  fileVerifies, listBlobFiles, listTempFiles, makeTempDir, readRawIndex, removeDir, silentComponents,
} from '../helpers/store-fixtures.js'

const ROOT = fileURLToPath(new URL('../..', import.meta.url))
const CHILD = fileURLToPath(new URL('../helpers/store-crash-child.ts', import.meta.url))
const ROUNDS = 8

function runChild (dataDir: string): { child: ChildProcess, started: Promise<void>, exited: Promise<void>, output: () => string } {
  const child = spawn(process.execPath, ['--import', 'tsx', CHILD, dataDir], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] })
  let out = ''
  let err = ''
  let resolveStarted!: () => void
  const started = new Promise<void>(resolve => { resolveStarted = resolve })
  child.stdout!.on('data', (b: Buffer) => { out += b.toString(); if (out.includes('started\n')) resolveStarted() })
  child.stderr!.on('data', (b: Buffer) => { err += b.toString() })
  const exited = new Promise<void>(resolve => child.once('exit', () => resolve()))
  return { child, started, exited, output: () => out + err }
}

async function checkIndexPointsAtCompleteFiles (dataDir: string): Promise<number> {
  const { blobs } = await readRawIndex(dataDir)
  for (const [d, info] of blobs) {
    expect(info.digest).toBe(d)
    expect(await fileVerifies(dataDir, d, info.size), `indexed ${d} verifies`).toBe(true)
  }
  return blobs.size
}

describe('fs store crash safety', () => {
  let dataDir: string
  let running: ChildProcess | undefined

  beforeEach(async () => { dataDir = await makeTempDir('pullmesh-crash-') })
  afterEach(async () => {
    if (running !== undefined && running.exitCode === null && running.signalCode === null) running.kill('SIGKILL')
    running = undefined
    await removeDir(dataDir)
  })

  it(`stays consistent across ${ROUNDS} SIGKILLs at random moments`, async () => {
    let maxIndexed = 0
    let killedBeforeStart = 0
    for (let round = 0; round < ROUNDS; round++) {
      const run = runChild(dataDir)
      running = run.child
      // Most rounds kill during the write loop; some kill at an arbitrary moment, which may be
      // during module loading or during the child's own start-up reconcile.
      if (round % 4 === 3) {
        await new Promise(resolve => setTimeout(resolve, randomInt(20, 800)))
      } else {
        await Promise.race([run.started, run.exited])
        await new Promise(resolve => setTimeout(resolve, randomInt(50, 700)))
      }
      if (!run.output().includes('started')) killedBeforeStart++
      expect(run.child.exitCode, `child died on its own:\n${run.output()}`).toBeNull()
      run.child.kill('SIGKILL')
      await run.exited
      running = undefined

      // Raw state left by the kill, before anything repairs it.
      maxIndexed = Math.max(maxIndexed, await checkIndexPointsAtCompleteFiles(dataDir))

      // Reopen (runs reconcile), then check the repaired state on disk.
      const store = createFsStore(silentComponents(), { dataDir })
      await store.start()
      const usage = store.usage()
      await store.stop()
      const { blobs, tags } = await readRawIndex(dataDir)
      expect(await listTempFiles(dataDir)).toEqual([])
      const files = await listBlobFiles(dataDir)
      expect(files.sort()).toEqual([...blobs.keys()].sort())
      for (const [d, info] of blobs) expect(await fileVerifies(dataDir, d, info.size)).toBe(true)
      for (const rec of tags.values()) expect(blobs.has(rec.digest)).toBe(true)
      expect(usage.blobs).toBe(blobs.size)
      expect(usage.bytes).toBe([...blobs.values()].reduce((n, i) => n + i.size, 0))
    }
    console.log(`crash test: ${ROUNDS} rounds, up to ${maxIndexed} indexed blobs, ${killedBeforeStart} kills before the store opened`)
    expect(maxIndexed).toBeGreaterThan(0)
  }, 120_000)
})
