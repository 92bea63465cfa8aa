// TLS for the client API: the certificate and key are read from files at start and again on
// reload (SIGHUP), so that a renewed certificate is served to new connections without a restart.
import { readFileSync } from 'node:fs'
import { readFile } from 'node:fs/promises'
import type { Server as HttpsServer } from 'node:https'
import { createSecureContext } from 'node:tls'

export interface TlsFiles { certFile: string, keyFile: string }
export interface TlsMaterial { cert: Buffer, key: Buffer }

/** Reads the pair and checks that it makes a usable context (a key that fits the certificate). */
export async function loadTls (files: TlsFiles): Promise<TlsMaterial> {
  const [cert, key] = await Promise.all([readFile(files.certFile), readFile(files.keyFile)])
  createSecureContext({ cert, key }) // throws on a malformed pair, before anything is served with it
  return { cert, key }
}

/** The same, synchronously: for building the server, which happens before anything starts. */
export function loadTlsSync (files: TlsFiles): TlsMaterial {
  const cert = readFileSync(files.certFile)
  const key = readFileSync(files.keyFile)
  createSecureContext({ cert, key })
  return { cert, key }
}

/** Serves a freshly read pair to new connections; on any error the current one stays in use. */
export async function reloadTls (server: HttpsServer, files: TlsFiles): Promise<void> {
  const m = await loadTls(files)
  server.setSecureContext({ cert: m.cert, key: m.key })
}
