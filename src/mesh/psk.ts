// The mesh key: a libp2p pnet v1 pre-shared key file. Parsed here, once, without loading libp2p, so that
// the config check, the data-path key and libp2p's pnet protector all see the same 32 bytes whatever
// the file's line endings, trailing newline or hex case.
import { readFile, stat } from 'node:fs/promises'

export const PSK_TAG = '/key/swarm/psk/1.0.0/'
export const PSK_CODEC = '/base16/'
export const PSK_BYTES = 32
const MAX_KEY_FILE = 4096

/** A mesh key file that cannot be read or is not a pnet v1 base16 key. The message never echoes the key. */
export class MeshKeyError extends Error {
  override readonly name = 'MeshKeyError'
  readonly code = 'ERR_MESH_KEY'
}

/**
 * Parses a pnet v1 key file: `/key/swarm/psk/1.0.0/`, `/base16/` and 64 hex digits, one per line.
 * Accepts LF, CRLF or CR line endings, a UTF-8 BOM, trailing blanks on a line and trailing empty lines;
 * refuses anything else (another codec, a short or long key, extra content). Returns the 32 key bytes.
 */
export function parseMeshKey (file: Uint8Array | string): Uint8Array {
  const text = typeof file === 'string' ? file : Buffer.from(file.buffer, file.byteOffset, file.byteLength).toString('utf8')
  if (text.length > MAX_KEY_FILE) throw new MeshKeyError('not a mesh key file: too large')
  const lines = text.replace(/^\uFEFF/, '').split(/\r\n|\r|\n/).map(l => l.replace(/[ \t]+$/, ''))
  while (lines.length > 0 && lines[lines.length - 1] === '') lines.pop()
  if (lines[0] !== PSK_TAG) throw new MeshKeyError(`not a mesh key file: the first line must be ${PSK_TAG}`)
  if (lines[1] !== PSK_CODEC) throw new MeshKeyError(`not a mesh key file: the second line must be ${PSK_CODEC} (the only encoding supported)`)
  if (lines.length !== 3 || !/^[0-9a-fA-F]{64}$/.test(lines[2] ?? '')) {
    throw new MeshKeyError(`not a mesh key file: the third and last line must be the ${PSK_BYTES}-byte key as 64 hex digits`)
  }
  return new Uint8Array(Buffer.from(lines[2]!, 'hex'))
}

/** The canonical file form of a key (LF, lowercase hex, no trailing newline): what libp2p's pnet is given. */
export function encodeMeshKey (psk: Uint8Array): Uint8Array {
  if (psk.byteLength !== PSK_BYTES) throw new MeshKeyError(`a mesh key has ${PSK_BYTES} bytes`)
  return new Uint8Array(Buffer.from(`${PSK_TAG}\n${PSK_CODEC}\n${Buffer.from(psk).toString('hex')}`, 'utf8'))
}

/** Reads and parses a mesh key file; every failure is a MeshKeyError naming the file. */
export async function loadMeshKey (path: string): Promise<Uint8Array> {
  let buf: Buffer
  try {
    const st = await stat(path)
    if (st.size > MAX_KEY_FILE) throw new MeshKeyError(`mesh key ${path}: not a mesh key file: too large`)
    buf = await readFile(path)
  } catch (err) {
    if (err instanceof MeshKeyError) throw err
    throw new MeshKeyError(`mesh key ${path}: cannot read it (${(err as NodeJS.ErrnoException).code ?? 'error'})`, { cause: err })
  }
  try {
    return parseMeshKey(buf)
  } catch (err) {
    throw new MeshKeyError(`mesh key ${path}: ${(err as Error).message}; create one with "pullmesh keygen FILE"`)
  }
}
