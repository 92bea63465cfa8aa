import type { OutgoingHttpHeaders } from 'node:http'
import type { Readable } from 'node:stream'
import type { FastifyReply } from 'fastify'

/** A body whose chunks can be handed back for reuse once the socket has their bytes (the store's blob files). */
interface Recycling extends Readable { recycle: (chunk: Buffer) => void }

function isRecycling (body: Readable): body is Recycling {
  return typeof (body as Partial<Recycling>).recycle === 'function'
}

/** Resolves once `body` has its first chunk (or its end) ready; rejects with its error if that comes first. */
async function firstReady (body: Readable): Promise<void> {
  await new Promise<void>((resolve, reject) => {
    const done = (err?: Error): void => {
      body.off('readable', onReady); body.off('error', done)
      if (err !== undefined) reject(err)
      else resolve()
    }
    const onReady = (): void => { done() }
    body.once('readable', onReady)
    body.once('error', done)
  })
}

/**
 * Sends a response body. A body that can take its chunks back is written here, not by fastify, because
 * only the write callback tells when the socket is done with a chunk: each chunk goes back then, so a
 * warm hit reads into the same few buffers (about twice the throughput of fresh ones). Until the first
 * chunk is ready nothing is sent, so an error before it still gets an OCI error answer; an error after
 * it aborts the response, as a truncated stream must.
 */
export async function sendBody (reply: FastifyReply, body: Readable): Promise<FastifyReply> {
  if (!isRecycling(body)) return reply.send(body)
  const res = reply.raw
  try {
    await firstReady(body)
  } catch (err) {
    body.destroy()
    throw err
  }
  reply.hijack()
  // A response pipelined behind another one on the same connection has no socket yet (res.socket is
  // null until Node assigns it): it is written now and queued by Node, not taken for a departed client.
  if (res.destroyed || res.socket?.destroyed === true) { body.destroy(); return reply }
  res.once('close', () => body.destroy())
  // Such a queued response never emits 'close' if the connection dies before its turn; its request does.
  reply.request.raw.once('close', () => { if (!res.writableFinished) body.destroy() })
  res.writeHead(reply.statusCode, reply.getHeaders() as OutgoingHttpHeaders)
  body.on('data', (chunk: Buffer) => {
    const more = res.write(chunk, err => { if (err == null) body.recycle(chunk) })
    if (!more) {
      body.pause()
      res.once('drain', () => body.resume())
    }
  })
  body.once('end', () => res.end())
  body.once('error', () => res.destroy())
  return reply
}
