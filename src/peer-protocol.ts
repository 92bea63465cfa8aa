import { createHash, createHmac, timingSafeEqual } from 'node:crypto'

/** The peer data path serves blobs under this prefix, by digest only. */
export const PEER_BLOB_PATH = '/pullmesh/v1/blobs/'

/**
 * Proof of the mesh key on the peer data path. A request carries
 * `x-pullmesh-auth: <ms since epoch>.<hex HMAC-SHA256(key, "<ms>\n<METHOD>\n<path>")>`, where the key
 * is derived from the pnet key file, so only nodes holding the mesh key can read blobs.
 */
export const AUTH_HEADER = 'x-pullmesh-auth'
const MAX_SKEW_MS = 60_000

export function dataPathKey (meshKeyFile: Uint8Array): Buffer {
  return createHash('sha256').update('pullmesh data path v1\n').update(meshKeyFile).digest()
}

export function signRequest (key: Buffer, method: string, path: string, now = Date.now()): string {
  const mac = createHmac('sha256', key).update(`${now}\n${method}\n${path}`).digest('hex')
  return `${now}.${mac}`
}

export function verifyRequest (key: Buffer, method: string, path: string, header: string | undefined, now = Date.now()): boolean {
  if (typeof header !== 'string') return false
  const m = /^(\d{1,15})\.([0-9a-f]{64})$/.exec(header)
  if (m === null) return false
  const ts = Number(m[1])
  if (Math.abs(now - ts) > MAX_SKEW_MS) return false
  const expected = createHmac('sha256', key).update(`${ts}\n${method}\n${path}`).digest()
  return timingSafeEqual(expected, Buffer.from(m[2]!, 'hex'))
}
