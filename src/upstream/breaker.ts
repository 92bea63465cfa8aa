// A per-upstream circuit breaker. After the upstream could not be reached at all (connect error,
// no response within the deadline), every request that needs it fails at once for the hold time;
// then one request probes it (half-open) while the others still fail fast, until the probe gets an
// answer. Pure logic with an injectable clock, so that it can be unit tested.
import { UpstreamUnavailableError } from '../errors.js'

/** The breaker is open: the upstream failed recently and is not asked again until `retryAfterS`. */
export class UpstreamCircuitOpenError extends UpstreamUnavailableError {
  override name = 'UpstreamCircuitOpenError'
  constructor (upstream: string, readonly retryAfterS: number, reason: string) {
    super(upstream, `upstream unreachable recently (${reason}); not asked again for ${retryAfterS} s`)
  }
}

export type BreakerState = 'closed' | 'open' | 'half-open'

export interface BreakerInit {
  upstream: string
  /** How long the breaker stays open after a failure. 0 disables the breaker. */
  holdMs: number
  now?: () => number
}

/** A permit for one exchange: report how it ended exactly once (later calls are ignored). */
export interface BreakerPermit {
  /** The upstream answered (any HTTP status): it is reachable. */
  reachable: () => void
  /** The upstream could not be reached (connect error, timeout without any answer). */
  unreachable: (reason: string) => void
  /** The exchange ended without telling either (the caller gave up). */
  release: () => void
}

export class CircuitBreaker {
  readonly #upstream: string
  readonly #holdMs: number
  readonly #now: () => number
  #openUntil = 0
  #reason = ''
  #tripped = false
  #probing = false

  constructor (init: BreakerInit) {
    this.#upstream = init.upstream
    this.#holdMs = init.holdMs
    this.#now = init.now ?? Date.now
  }

  get state (): BreakerState {
    if (!this.#tripped) return 'closed'
    return this.#now() < this.#openUntil ? 'open' : 'half-open'
  }

  /** Until when (ms since epoch) requests fail fast; undefined when the breaker is closed. */
  get openUntil (): number | undefined { return this.#tripped ? this.#openUntil : undefined }

  /** True when a request may be sent now without waiting for a probe. */
  get available (): boolean { return this.state === 'closed' }

  /** Admits one exchange or throws UpstreamCircuitOpenError. Half-open admits one probe at a time. */
  acquire (): BreakerPermit {
    if (this.#tripped) {
      const now = this.#now()
      if (now < this.#openUntil || this.#probing) {
        const retryAfterS = Math.max(1, Math.ceil((Math.max(this.#openUntil, now + 1000) - now) / 1000))
        throw new UpstreamCircuitOpenError(this.#upstream, retryAfterS, this.#reason)
      }
      this.#probing = true
      return this.#permit(true)
    }
    return this.#permit(false)
  }

  #permit (probe: boolean): BreakerPermit {
    let done = false
    const end = (): boolean => {
      if (done) return false
      done = true
      if (probe) this.#probing = false
      return true
    }
    return {
      reachable: () => {
        if (!end()) return
        this.#tripped = false
        this.#openUntil = 0
      },
      unreachable: (reason: string) => {
        if (!end() || this.#holdMs <= 0) return
        this.#tripped = true
        this.#reason = reason
        this.#openUntil = this.#now() + this.#holdMs
      },
      release: () => { end() },
    }
  }
}
