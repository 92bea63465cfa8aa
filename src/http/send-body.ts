import type { OutgoingHttpHeaders } from 'node:http'
import type { Readable } from 'node:stream'
import type { FastifyReply } from 'fastify'

/** A body whose chunks can be handed back for reuse once the socket has their bytes (the store's blob files). */
interface Recycling extends Readable { recycle: (chunk: Buffer) => void }

function isRecycling (body: Readable): body is Recycling {
  return typeof (body as Partial<Recycling>).recycle === 'function'
}

/**
 * Sends a response body. A body that can take its chunks back is written here, not by fastify, because
 * only the write callback tells when the socket is done with a chunk: each chunk goes back then, so a
 * warm hit reads into the same few buffers (twice the throughput of fresh ones). Headers must be set
 * and the body opened already; an error after that aborts the response, as a truncated stream must.
 */
export function sendBody (reply: FastifyReply, body: Readable): FastifyReply {
  if (!isRecycling(body)) return reply.send(body)
  const res = reply.raw
  reply.hijack()
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
  res.once('close', () => body.destroy())
  return reply
}
