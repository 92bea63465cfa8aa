import { createHash, type Hash } from 'node:crypto'
import { digestInvalid } from '../errors.js'

/** A validated content digest, `algorithm:hex`. Only the parsers here create one. */
export type Digest = string & { readonly __brand: 'Digest' }

const ALGORITHMS: Record<string, { hex: number, node: string }> = {
  sha256: { hex: 64, node: 'sha256' },
  sha512: { hex: 128, node: 'sha512' },
}

/** Returns the digest if `s` is a well-formed digest of a supported algorithm, else undefined. */
export function tryParseDigest (s: string): Digest | undefined {
  const i = s.indexOf(':')
  if (i <= 0) return undefined
  const alg = ALGORITHMS[s.slice(0, i)]
  if (alg === undefined) return undefined
  const hex = s.slice(i + 1)
  if (hex.length !== alg.hex || !/^[a-f0-9]+$/.test(hex)) return undefined
  return s as Digest
}

/** Parses a digest or throws the OCI `DIGEST_INVALID` error. */
export function parseDigest (s: string): Digest {
  const d = tryParseDigest(s)
  if (d === undefined) throw digestInvalid({ digest: s.slice(0, 200), reason: 'expected sha256:<64 hex> or sha512:<128 hex>' })
  return d
}

export function isDigestLike (s: string): boolean {
  return /^[a-z0-9]+(?:[+._-][a-z0-9]+)*:/.test(s)
}

export function digestAlgorithm (d: Digest): string { return d.slice(0, d.indexOf(':')) }
export function digestHex (d: Digest): string { return d.slice(d.indexOf(':') + 1) }

export function createDigester (d: Digest): Hash {
  return createHash(digestHashName(d))
}

/** The node:crypto name of the digest's algorithm. */
export function digestHashName (d: Digest): string {
  return ALGORITHMS[digestAlgorithm(d)]!.node
}

export function sha256Of (buf: Uint8Array): Digest {
  return `sha256:${createHash('sha256').update(buf).digest('hex')}` as Digest
}

/** Digest of `buf` with the same algorithm as `like`. */
export function digestOf (buf: Uint8Array, like: Digest): Digest {
  return `${digestAlgorithm(like)}:${createDigester(like).update(buf).digest('hex')}` as Digest
}
