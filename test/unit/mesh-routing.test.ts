import { describe, expect, it } from 'vitest'
import { createHash } from 'node:crypto'
import { CID } from 'multiformats/cid'
import { agentFor, dataPortOfAgent, digestCid } from '../../src/mesh/routing.js'
import type { Digest } from '../../src/oci/digest.js'

describe('mesh routing: DHT keys and the data port in the identify agent', () => {
  it('keys a sha256 digest by its own multihash, in a form the remote side decodes', () => {
    const hex = createHash('sha256').update('a').digest('hex')
    const cid = digestCid(`sha256:${hex}` as Digest)!
    expect(Buffer.from(cid.multihash.bytes).toString('hex')).toBe(`1220${hex}`)
    // kad-dht sends only the multihash; the receiver runs CID.decode on it (throws for anything but sha2-256/32).
    expect(CID.decode(cid.multihash.bytes).multihash.bytes).toEqual(cid.multihash.bytes)
  })

  it('keys a sha512 digest by a sha2-256 multihash of its bytes (decodable remotely, distinct)', () => {
    const hex = createHash('sha512').update('a').digest('hex')
    const cid = digestCid(`sha512:${hex}` as Digest)!
    const expected = createHash('sha256').update(Buffer.from(hex, 'hex')).digest('hex')
    expect(Buffer.from(cid.multihash.bytes).toString('hex')).toBe(`1220${expected}`)
    expect(() => CID.decode(cid.multihash.bytes)).not.toThrow()
    expect(digestCid(`sha512:${hex}` as Digest)!.equals(cid)).toBe(true)
  })

  it('has no key for other algorithms or wrong lengths', () => {
    expect(digestCid('sha384:00' as Digest)).toBeUndefined()
    expect(digestCid('sha256:00ff' as Digest)).toBeUndefined()
  })

  it('reads the data port from our agent string only', () => {
    expect(dataPortOfAgent(agentFor(5001))).toBe(5001)
    for (const bad of [undefined, '', 'js-libp2p/3.0 node/20', 'pullmesh data-port/0', 'pullmesh data-port/70000', 'pullmesh data-port/80 x', 'xpullmesh data-port/80']) {
      expect(dataPortOfAgent(bad)).toBeUndefined()
    }
  })
})
