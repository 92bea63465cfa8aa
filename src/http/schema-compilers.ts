// fastify builds its default schema compilers for every instance it creates: the validator factory loads
// ajv (with its JSON Type Definition build) and the serializer factory fast-json-stringify. No route of ours
// declares a schema, so that work (~90 ms of a daemon's start-up on a loaded 2-core host, more than any
// other single step after module loading) bought nothing. These factories load the very same compilers,
// resolved from fastify's own directory as fastify resolves them, the first time a route with a schema is
// compiled, and never otherwise. (One difference should a route ever declare a `headers` schema: fastify
// treats these factories as custom compilers and does not lower-case that schema's keys, so write them in
// lower case.)
import { createRequire } from 'node:module'
import type { FastifyServerOptions } from 'fastify'

type CompilersFactory = NonNullable<NonNullable<FastifyServerOptions['schemaController']>['compilersFactory']>
/** What `require('@fastify/ajv-compiler')()` and `require('@fastify/fast-json-stringify-compiler')()` return. */
type Build = (externalSchemas: unknown, options: unknown) => unknown

/** fastify's `schemaController.compilersFactory`, with fastify's default compilers loaded on first use. */
export function lazySchemaCompilers (): CompilersFactory {
  let fromFastify: NodeRequire | undefined
  const lazily = (id: string): Build => {
    let build: Build | undefined
    return (externalSchemas, options) => {
      fromFastify ??= createRequire(createRequire(import.meta.url).resolve('fastify'))
      build ??= (fromFastify(id) as () => Build)()
      return build(externalSchemas, options)
    }
  }
  return {
    buildValidator: lazily('@fastify/ajv-compiler'),
    buildSerializer: lazily('@fastify/fast-json-stringify-compiler'),
  } as unknown as CompilersFactory
}
