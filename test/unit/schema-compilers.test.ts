// The lazy schema compilers (src/http/schema-compilers.ts) keep fastify's schema features whole: a route
// that declares a schema is validated by ajv and serialized by fast-json-stringify, loaded on first use.
import { afterEach, describe, expect, it } from 'vitest'
import Fastify, { type FastifyInstance } from 'fastify'
import { lazySchemaCompilers } from '../../src/http/schema-compilers.js'

describe('lazySchemaCompilers', () => {
  let app: FastifyInstance | undefined
  afterEach(async () => { await app?.close(); app = undefined })

  it('validates requests and serializes responses for a route with a schema', async () => {
    app = Fastify({ logger: false, schemaController: { compilersFactory: lazySchemaCompilers() } })
    app.get('/n', {
      schema: {
        querystring: { type: 'object', properties: { n: { type: 'integer', minimum: 1 } }, required: ['n'] },
        response: { 200: { type: 'object', properties: { double: { type: 'integer' } } } },
      },
    }, async (req) => ({ double: (req.query as { n: number }).n * 2, secret: 'not in the schema' }))
    const ok = await app.inject({ method: 'GET', url: '/n?n=21' })
    expect(ok.statusCode).toBe(200)
    // fast-json-stringify writes only what the response schema names.
    expect(ok.body).toBe('{"double":42}')
    const bad = await app.inject({ method: 'GET', url: '/n?n=zero' })
    expect(bad.statusCode).toBe(400)
    expect(bad.json()).toMatchObject({ code: 'FST_ERR_VALIDATION' })
    const missing = await app.inject({ method: 'GET', url: '/n' })
    expect(missing.statusCode).toBe(400)
  })

  it('leaves routes without a schema alone', async () => {
    app = Fastify({ logger: false, schemaController: { compilersFactory: lazySchemaCompilers() } })
    app.get('/plain', async () => ({ a: 1, b: 'two' }))
    const r = await app.inject({ method: 'GET', url: '/plain' })
    expect(r.statusCode).toBe(200)
    expect(r.json()).toEqual({ a: 1, b: 'two' })
  })
})
