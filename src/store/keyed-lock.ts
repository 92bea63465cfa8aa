/** Runs async sections one at a time per key; different keys run concurrently. */
export class KeyedLock<K> {
  readonly #tails = new Map<K, Promise<void>>()

  async run<T> (key: K, fn: () => Promise<T>): Promise<T> {
    const prev = this.#tails.get(key) ?? Promise.resolve()
    let release!: () => void
    const mine = new Promise<void>(resolve => { release = resolve })
    const tail = prev.then(() => mine)
    this.#tails.set(key, tail)
    await prev
    try {
      return await fn()
    } finally {
      release()
      if (this.#tails.get(key) === tail) this.#tails.delete(key)
    }
  }

  /** Resolves when every section queued so far has finished. */
  async idle (): Promise<void> {
    while (this.#tails.size > 0) await Promise.allSettled([...this.#tails.values()])
  }
}

/** A single serial queue. */
export class SerialQueue {
  #tail: Promise<unknown> = Promise.resolve()

  run<T> (fn: () => Promise<T>): Promise<T> {
    const p = this.#tail.then(fn)
    this.#tail = p.catch(() => undefined)
    return p
  }
}
