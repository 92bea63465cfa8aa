// The node's libp2p identity, persisted in <dataDir>/peer-key (protobuf-encoded private key, mode 0600).
import { mkdir, open, readFile, rename, chmod, stat, unlink } from 'node:fs/promises'
import { randomBytes } from 'node:crypto'
import { join } from 'node:path'
import { generateKeyPair, privateKeyFromProtobuf, privateKeyToProtobuf } from '@libp2p/crypto/keys'
import type { PrivateKey } from '@libp2p/interface'

export const PEER_KEY_FILE = 'peer-key'
const MAX_KEY_FILE = 16 * 1024

export class PeerKeyError extends Error {
  override readonly name = 'PeerKeyError'
  readonly code = 'ERR_MESH_PEER_KEY'
}

/** Loads the identity from dataDir, or creates (and atomically persists) a new Ed25519 one. */
export async function loadOrCreatePeerKey (dataDir: string): Promise<{ key: PrivateKey, created: boolean }> {
  const path = join(dataDir, PEER_KEY_FILE)
  let buf: Buffer | undefined
  try {
    const st = await stat(path)
    if (st.size > MAX_KEY_FILE) throw new PeerKeyError(`${path} is too large to be a peer key`)
    if ((st.mode & 0o077) !== 0) await chmod(path, 0o600)
    buf = await readFile(path)
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err
  }
  if (buf !== undefined) {
    try {
      return { key: privateKeyFromProtobuf(buf), created: false }
    } catch (err) {
      // Never replace an identity silently: the operator decides.
      throw new PeerKeyError(`${path} is not a valid libp2p private key (delete it to create a new identity)`, { cause: err })
    }
  }
  const key = await generateKeyPair('Ed25519')
  await mkdir(dataDir, { recursive: true })
  await writeFileAtomic(path, privateKeyToProtobuf(key), 0o600)
  return { key, created: true }
}

async function writeFileAtomic (path: string, data: Uint8Array, mode: number): Promise<void> {
  const tmp = `${path}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`
  const fh = await open(tmp, 'wx', mode)
  try {
    await fh.writeFile(data)
    await fh.sync()
  } catch (err) {
    await fh.close().catch(() => {})
    await unlink(tmp).catch(() => {})
    throw err
  }
  await fh.close()
  try {
    await rename(tmp, path)
  } catch (err) {
    await unlink(tmp).catch(() => {})
    throw err
  }
  const dir = await open(join(path, '..'), 'r')
  try { await dir.sync() } catch { /* some filesystems cannot fsync a directory */ } finally { await dir.close() }
}
