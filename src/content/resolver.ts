import type { Readable } from 'node:stream'
import type { Logger } from '../logger.js'
import type { Metrics } from '../metrics.js'
import type { BlobStore, TagRecord } from '../store/types.js'
import type { UpstreamClient } from '../upstream/types.js'
import type { Digest } from '../oci/digest.js'
import type { Reference, Target } from '../oci/reference.js'
import type { ByteRange } from '../oci/range.js'
import type { BlobHandle, ContentOrigin, ManifestResult, PeerContent } from './types.js'
import type { PeerHolder } from '../mesh/types.js'
import { parseReference, parseRepoName } from '../oci/reference.js'
import { digestOf, sha256Of, tryParseDigest } from '../oci/digest.js'
import { INDEX_MEDIA_TYPES, MANIFEST_MEDIA_TYPES, MAX_MANIFEST_BYTES, SINGLE_MANIFEST_MEDIA_TYPES, accepts, sniffManifestMediaType } from '../oci/media-types.js'
import { NotFoundError, OciError, UpstreamDeniedError, UpstreamError, UpstreamProtocolError, UpstreamRateLimitedError, UpstreamUnavailableError, VerificationError, blobUnknown, manifestUnknown } from '../errors.js'
import { Fill, type FillSource } from './fill.js'

export interface ResolverInit {
  /** A tag mapping younger than this is answered from the index without asking the upstream. */
  tagTtlMs: number
  /** How long revalidating a cached tag may take before the cached answer is served (default 5 s). */
  revalidateTimeoutMs?: number
  /** After the upstream failed, cached tags are served without asking it for this long (default 15 s). */
  outageHoldMs?: number
  /** Upstreams whose credentialed content may still be shared with peers. */
  shareCredentialed?: ReadonlySet<string>
  /** Upstream name → its mesh-wide id (see upstreamId in delegation.ts). Needed for delegation. */
  upstreamIds?: ReadonlyMap<string, string>
  /** Ask the node chosen to fetch a miss for the mesh instead of the upstream (default: true with a mesh). */
  delegate?: boolean
  /**
   * Let the chosen node resolve tags for us while the upstream is up. Only in a keyed mesh: a peer's
   * word on a tag is trusted only from nodes that hold the mesh key.
   */
  delegateTags?: boolean
  /** With the upstream unreachable, how long a tag that peers can answer waits for it (default 5 s). */
  outageProbeMs?: number
}

/** A fetcher asked to fill a digest that it is itself waiting on another node for: the asker should not wait. */
export class FetcherBusyError extends Error {
  override readonly name = 'FetcherBusyError'
  readonly code = 'PM_FETCHER_BUSY'
}

export interface ResolverComponents {
  store: BlobStore
  upstreams: ReadonlyMap<string, UpstreamClient>
  /** The mesh, when there is one. */
  peers?: PeerContent
  logger: Logger
  metrics: Metrics
  now?: () => number
}

export interface Resolver {
  manifest (target: Target, ref: Reference, accept: string[], signal?: AbortSignal): Promise<ManifestResult>
  blob (target: Target, digest: Digest, signal?: AbortSignal): Promise<BlobHandle>
  /**
   * Content this node can serve without fetching anything: the store, or a fill in progress (whose
   * readers hold the last byte back until it verifies). For the peer data path, which never forwards.
   */
  localBlob (digest: Digest, o?: { forPeer?: boolean }): Promise<BlobHandle | undefined>
  /**
   * A peer chose this node to fetch `digest` for the mesh: from the store, a running fill, or the
   * upstream (never from another peer, so a delegated fetch is one hop). Undefined if this node does
   * not fetch from that upstream for peers. Throws FetcherBusyError if our own fill is waiting on a peer.
   */
  blobForPeer (upstreamId: string, repo: string, digest: Digest, signal?: AbortSignal): Promise<BlobHandle | undefined>
  /** The same for a manifest by tag or digest; `verifiedAt` is when the upstream last confirmed a tag. */
  manifestForPeer (upstreamId: string, repo: string, reference: string, signal?: AbortSignal): Promise<(ManifestResult & { verifiedAt?: number }) | undefined>
  start (): void
  /** Aborts running fills and waits for them to clean up. */
  stop (): Promise<void>
  /** Digests being filled right now (they must not be evicted). */
  activeFills (): Digest[]
}

/**
 * The one place that decides where content comes from: local store, then peers, then the upstream.
 * Every fill is verified before it becomes visible in the store; concurrent requests share one fill.
 */
export function createResolver (components: ResolverComponents, init: ResolverInit): Resolver {
  const { store, upstreams, peers, metrics } = components
  const log = components.logger.child({ component: 'resolver' })
  const now = components.now ?? Date.now
  const fills = new Map<Digest, Fill>()
  const manifestFlights = new Map<string, Promise<ManifestResult>>()
  /** Flights (by key) that are waiting on another node right now. */
  const delegatingFlights = new Set<string>()

  /** Runs `fn` with the flight marked as waiting on another node. */
  async function delegatingAs<T> (flightKey: string, fn: () => Promise<T>): Promise<T> {
    delegatingFlights.add(flightKey)
    try { return await fn() } finally { delegatingFlights.delete(flightKey) }
  }
  let lifetime = new AbortController()
  const revalidateTimeoutMs = init.revalidateTimeoutMs ?? 5_000
  const outageHoldMs = init.outageHoldMs ?? 15_000
  /** Upstreams that failed recently: until when cached tags skip revalidation. */
  const downUntil = new Map<string, number>()
  const outageProbeMs = init.outageProbeMs ?? revalidateTimeoutMs
  const delegating = peers !== undefined && init.delegate !== false
  /** upstream id → name, for upstreams whose content may be shared with peers. */
  const sharedById = new Map<string, string>()
  for (const [name, id] of init.upstreamIds ?? []) {
    const up = upstreams.get(name)
    if (up !== undefined && !isPrivate(up) && !sharedById.has(id)) sharedById.set(id, name)
  }

  /** The peer chosen to fetch `key` from this target's upstream, when it is not us and sharing is allowed. */
  function fetcherOf (target: Target, key: string, up: UpstreamClient): { id: string, fetcher: PeerHolder } | undefined {
    if (!delegating || isPrivate(up)) return undefined
    const id = init.upstreamIds?.get(target.upstream)
    if (id === undefined) return undefined
    const f = peers!.fetcherFor(id, key)
    return f === undefined || f === 'self' ? undefined : { id, fetcher: f }
  }

  function upstreamFor (target: Target): UpstreamClient {
    const up = upstreams.get(target.upstream)
    if (up === undefined) throw new OciError('NAME_UNKNOWN', 404, 'upstream is not configured', { upstream: target.upstream })
    return up
  }

  function isPrivate (up: UpstreamClient): boolean {
    return up.authenticated && !(init.shareCredentialed?.has(up.name) ?? false)
  }

  const repoKey = (t: Target): string => `${t.upstream}/${t.repo}`

  // ---------------------------------------------------------------- manifests

  async function manifest (target: Target, ref: Reference, accept: string[], signal?: AbortSignal, direct = false): Promise<ManifestResult> {
    // One flight per manifest, which a fetch on a peer's behalf (`direct`) joins too, unless that flight
    // is itself waiting on another node: two nodes that each think the other is the fetcher would then
    // wait on each other, so the peer's fetch goes to the upstream in a flight of its own.
    // Keyed by the upstream's id, not its name: two names for one registry (a dotted alias for skopeo,
    // HOST:PORT for containerd) share one flight.
    const base = `${init.upstreamIds?.get(target.upstream) ?? target.upstream}/${target.repo}@${ref.kind === 'tag' ? ref.tag : ref.digest}`
    const key = direct && delegatingFlights.has(base) ? `${base}#direct` : base
    let flight = manifestFlights.get(key)
    if (flight === undefined) {
      flight = (ref.kind === 'digest' ? manifestByDigest(target, ref.digest, direct, key) : manifestByTag(target, ref.tag, direct, key))
        .finally(() => manifestFlights.delete(key))
      manifestFlights.set(key, flight)
    }
    // A client that hangs up stops waiting at once; the flight goes on for the others.
    const m = await raceSignal(flight, signal)
    return negotiate(target, m, accept, signal)
  }

  /** Serves what the client accepts: an index to a client that takes only single manifests gets the linux/amd64 one. */
  async function negotiate (target: Target, m: ManifestResult, accept: string[], signal?: AbortSignal): Promise<ManifestResult> {
    if (accepts(accept, m.mediaType)) return m
    if (INDEX_MEDIA_TYPES.includes(m.mediaType) && SINGLE_MANIFEST_MEDIA_TYPES.some(t => accepts(accept, t))) {
      const d = pickDefaultPlatform(m.body)
      if (d !== undefined) return await manifest(target, { kind: 'digest', digest: d }, accept, signal)
    }
    throw manifestUnknown({ reason: 'the manifest exists but not in a media type the client accepts', mediaType: m.mediaType, accept })
  }

  async function fromStore (digest: Digest, repo: string): Promise<ManifestResult | undefined> {
    const info = await store.stat(digest)
    if (info === undefined) return undefined
    const body = await store.readBuffer(digest, MAX_MANIFEST_BYTES)
    if (body === undefined) return undefined
    store.touch(digest, repo)
    // A manifest first cached through /blobs/ was stored as octet-stream: its own bytes tell its type.
    const mediaType = MANIFEST_MEDIA_TYPES.includes(info.mediaType) ? info.mediaType : (sniffManifestMediaType(body) ?? info.mediaType)
    return { body, mediaType, digest, source: 'store' }
  }

  async function manifestByDigest (target: Target, digest: Digest, direct = false, flightKey = ''): Promise<ManifestResult> {
    const local = await fromStore(digest, repoKey(target))
    if (local !== undefined) {
      metrics.cacheLookups.inc({ kind: 'manifest', result: 'hit' })
      return local
    }
    metrics.cacheLookups.inc({ kind: 'manifest', result: 'miss' })
    const up = upstreamFor(target)
    if (!direct) {
      const fromPeer = await manifestFromPeers(target, digest, lifetime.signal)
      if (fromPeer !== undefined) return fromPeer
      // By digest, the bytes prove themselves: any mesh may fetch them for us.
      const chosen = fetcherOf(target, `manifest:${digest}`, up)
      if (chosen !== undefined) {
        const d = await delegatingAs(flightKey, async () => await peers!.delegateManifest(chosen.fetcher, chosen.id, target.repo, digest, MAX_MANIFEST_BYTES, lifetime.signal))
        if (d !== undefined && digestOf(d.body, digest) === digest) {
          metrics.upstreamAvoided.inc({ kind: 'manifest' })
          return await keepManifest(target, digest, d.body, d.mediaType, false, 'peer')
        }
        if (d !== undefined) metrics.verificationFailures.inc({ source: 'peer' })
      }
    }
    const res = await up.getManifest(target.repo, digest, { signal: lifetime.signal })
    if (res === undefined) throw manifestUnknown({ digest })
    const actual = digestOf(res.body, digest)
    if (actual !== digest) {
      metrics.verificationFailures.inc({ source: 'upstream' })
      throw new UpstreamProtocolError(up.name, `manifest fetched by digest ${digest} hashes to ${actual}`)
    }
    return await keepManifest(target, digest, res.body, res.mediaType, isPrivate(up), 'upstream')
  }

  async function manifestFromPeers (target: Target, digest: Digest, signal: AbortSignal): Promise<ManifestResult | undefined> {
    if (peers === undefined) return undefined
    // fetchSmall verifies the bytes against the digest (and moves on to the next peer on a lie).
    const body = await peers.fetchSmall(digest, MAX_MANIFEST_BYTES, signal).catch(() => undefined)
    if (body === undefined) return undefined
    const mediaType = sniffManifestMediaType(body)
    if (mediaType === undefined) return undefined
    metrics.meshHits.inc({ kind: 'manifest' })
    return await keepManifest(target, digest, body, mediaType, false, 'peer')
  }

  async function keepManifest (target: Target, digest: Digest, body: Buffer, mediaType: string, priv: boolean, source: ContentOrigin): Promise<ManifestResult> {
    const type = SINGLE_MANIFEST_MEDIA_TYPES.includes(mediaType) || INDEX_MEDIA_TYPES.includes(mediaType)
      ? mediaType
      : (sniffManifestMediaType(body) ?? mediaType)
    await store.putBuffer(digest, body, { mediaType: type, repo: repoKey(target), private: priv })
    return { body, mediaType: type, digest, source }
  }

  async function manifestByTag (target: Target, tag: string, direct = false, flightKey = ''): Promise<ManifestResult> {
    const up = upstreamFor(target)
    const rec = await store.getTag(target.upstream, target.repo, tag)
    const cached = rec !== undefined ? await fromStore(rec.digest, repoKey(target)) : undefined
    if (rec !== undefined && cached !== undefined && now() - rec.verifiedAt < init.tagTtlMs) {
      metrics.cacheLookups.inc({ kind: 'manifest', result: 'hit' })
      return cached
    }
    const revalidating = rec !== undefined && cached !== undefined
    // Peers can answer this tag if the upstream turns out to be down (used only then, and only without a record of ours).
    const peersKnow = !revalidating && !direct && (peers?.tagRecords(target.upstream, target.repo, tag).length ?? 0) > 0
    if ((revalidating || peersKnow) && ((downUntil.get(up.name) ?? 0) > now() || !up.available())) {
      const stale = await staleAnswer(target, tag, rec, cached, 'upstream recently failed', true)
      if (stale !== undefined) return stale
    }
    if (!revalidating && !direct && init.delegateTags === true) {
      // A cold tag: the node chosen for it asks the upstream once for the whole (keyed) mesh.
      const chosen = fetcherOf(target, `tag:${target.repo}:${tag}`, up)
      if (chosen !== undefined) {
        const viaPeer = await delegatingAs(flightKey, async () => await tagFromFetcher(target, tag, chosen))
        if (viaPeer !== undefined) return viaPeer
      }
    }
    // With a cached answer in hand, or peers that can answer, an unreachable upstream is not waited on for long.
    const deadline = revalidating ? AbortSignal.timeout(revalidateTimeoutMs) : peersKnow ? AbortSignal.timeout(outageProbeMs) : undefined
    const signal = deadline !== undefined ? AbortSignal.any([lifetime.signal, deadline]) : lifetime.signal
    try {
      if (revalidating) {
        // Revalidate: a HEAD is enough when the digest has not moved.
        const head = await up.headManifest(target.repo, tag, { signal })
        if (head === undefined) {
          await store.deleteTag(target.upstream, target.repo, tag)
          throw manifestUnknown({ tag })
        }
        if (head.digest === rec!.digest) {
          downUntil.delete(up.name)
          // The answer is confirmed; failing to note when (a full disk) must not fail the pull.
          await store.putTag(target.upstream, target.repo, tag, { ...rec!, verifiedAt: now() })
            .catch((err: unknown) => log.warn({ err: (err as { code?: string }).code ?? String(err), repo: target.repo, tag }, 'could not record the tag\'s revalidation; serving it anyway'))
          metrics.cacheLookups.inc({ kind: 'manifest', result: 'hit' })
          return cached
        }
      }
      metrics.cacheLookups.inc({ kind: 'manifest', result: 'miss' })
      const res = await up.getManifest(target.repo, tag, { signal })
      if (res === undefined) {
        if (rec !== undefined) await store.deleteTag(target.upstream, target.repo, tag)
        throw manifestUnknown({ tag })
      }
      const digest = sha256Of(res.body)
      const claimed = res.digest !== undefined ? tryParseDigest(res.digest) : undefined
      if (claimed !== undefined && digestOf(res.body, claimed) !== claimed) {
        metrics.verificationFailures.inc({ source: 'upstream' })
        throw new UpstreamProtocolError(up.name, `manifest for tag ${tag} does not match its Docker-Content-Digest`)
      }
      const kept = await keepManifest(target, digest, res.body, res.mediaType, isPrivate(up), 'upstream')
      await store.putTag(target.upstream, target.repo, tag, {
        digest, mediaType: kept.mediaType, size: res.body.length, verifiedAt: now(), private: isPrivate(up),
      })
      downUntil.delete(up.name)
      return kept
    } catch (err) {
      const timedOut = deadline?.aborted === true && !lifetime.signal.aborted
      if (!(err instanceof UpstreamError) && !timedOut) throw err
      const outage = timedOut || err instanceof UpstreamUnavailableError || err instanceof UpstreamRateLimitedError
      if (err instanceof UpstreamUnavailableError || timedOut) downUntil.set(up.name, now() + outageHoldMs)
      const reason = timedOut ? `no answer within ${revalidating ? revalidateTimeoutMs : outageProbeMs} ms` : (err as UpstreamError).code
      // Our own record answers any upstream failure; peers' records only an outage (a 401, 403 or 404 is an answer).
      const stale = await staleAnswer(target, tag, rec, cached, reason, outage && !direct)
      if (stale !== undefined) return stale
      throw timedOut ? new UpstreamUnavailableError(up.name, reason) : err
    }
  }

  /** Asks the node chosen for this tag to resolve it; verifies the manifest it sends against the digest it names. */
  async function tagFromFetcher (target: Target, tag: string, chosen: { id: string, fetcher: PeerHolder }): Promise<ManifestResult | undefined> {
    const d = await peers!.delegateManifest(chosen.fetcher, chosen.id, target.repo, tag, MAX_MANIFEST_BYTES, lifetime.signal)
    if (d === undefined) return undefined
    const claimed = tryParseDigest(d.digest)
    if (claimed === undefined || digestOf(d.body, claimed) !== claimed) {
      metrics.verificationFailures.inc({ source: 'peer' })
      log.warn({ peer: chosen.fetcher.peerId, tag, repo: target.repo }, 'the node chosen for this tag sent a manifest that does not match its digest; asking the upstream')
      return undefined
    }
    const kept = await keepManifest(target, claimed, d.body, d.mediaType, false, 'peer')
    const verifiedAt = Math.min(d.verifiedAt ?? now(), now())
    await store.putTag(target.upstream, target.repo, tag, { digest: claimed, mediaType: kept.mediaType, size: d.body.length, verifiedAt, private: false })
    metrics.cacheLookups.inc({ kind: 'manifest', result: 'miss' })
    metrics.upstreamAvoided.inc({ kind: 'tag' })
    return kept
  }

  /**
   * The upstream failed: our own verified record answers (stale-if-error). A peer's record never
   * overrides ours; only when we have none, and only when the upstream is unreachable (`usePeers`),
   * does the freshest record a peer announced answer.
   */
  async function staleAnswer (target: Target, tag: string, rec: TagRecord | undefined, cached: ManifestResult | undefined, reason: string, usePeers: boolean): Promise<ManifestResult | undefined> {
    const candidates: Array<{ record: TagRecord, local: boolean }> = []
    if (rec !== undefined && cached !== undefined) candidates.push({ record: rec, local: true })
    // Peers' claims are never trusted to be newer than now.
    if (candidates.length === 0 && usePeers) {
      for (const r of peers?.tagRecords(target.upstream, target.repo, tag) ?? []) {
        candidates.push({ record: { ...r, verifiedAt: Math.min(r.verifiedAt, now()) }, local: false })
      }
      candidates.sort((a, b) => b.record.verifiedAt - a.record.verifiedAt)
    }
    for (const c of candidates) {
      const m = c.local ? cached : await manifestByDigestQuiet(target, c.record.digest)
      if (m === undefined) continue
      // A mesh record is kept as already due for revalidation: the upstream is asked as soon as it answers.
      if (!c.local) await store.putTag(target.upstream, target.repo, tag, { ...c.record, verifiedAt: Math.min(c.record.verifiedAt, now() - init.tagTtlMs - 1), private: false })
      metrics.staleServed.inc({ upstream: target.upstream })
      log.warn({ upstream: target.upstream, repo: target.repo, tag, digest: c.record.digest, verifiedAt: new Date(c.record.verifiedAt).toISOString(), from: c.local ? 'local' : 'mesh', reason }, 'upstream failed; serving cached tag (stale-if-error)')
      return m
    }
    return undefined
  }

  async function manifestByDigestQuiet (target: Target, digest: Digest): Promise<ManifestResult | undefined> {
    return await fromStore(digest, repoKey(target)) ?? await manifestFromPeers(target, digest, lifetime.signal)
  }

  // ---------------------------------------------------------------- blobs

  function storeHandle (digest: Digest, size: number): BlobHandle {
    return {
      digest,
      size,
      source: 'store',
      open: async (range?: ByteRange): Promise<Readable> => {
        const s = await store.createReadStream(digest, range)
        if (s === undefined) throw blobUnknown({ digest, reason: 'evicted while being requested; retry' })
        return s
      },
    }
  }

  async function localBlob (digest: Digest, o?: { forPeer?: boolean }): Promise<BlobHandle | undefined> {
    const info = await store.stat(digest)
    if (info !== undefined) {
      if (o?.forPeer === true && info.private) return undefined
      store.touch(digest)
      return storeHandle(digest, info.size)
    }
    const fill = fills.get(digest)
    if (fill === undefined || fill.state !== 'running' || fill.size === undefined) return undefined
    if (o?.forPeer === true && fill.isPrivate) return undefined
    return fillHandle(fill, fill.size)
  }

  function fillHandle (f: Fill, size: number): BlobHandle {
    const origin = (): ContentOrigin => {
      const k = (f.source ?? f.activeSource())?.kind
      return k === undefined ? 'fill' : k === 'upstream' ? 'upstream' : 'peer'
    }
    return { digest: f.digest, size, source: 'fill', origin, open: async (range?: ByteRange) => f.createReader(range) }
  }

  async function blobForPeer (upstreamId: string, repo: string, digest: Digest, signal?: AbortSignal): Promise<BlobHandle | undefined> {
    const name = sharedById.get(upstreamId)
    if (name === undefined) return undefined
    const local = await localBlob(digest, { forPeer: true })
    if (local !== undefined) { metrics.servedForPeers.inc({ kind: 'blob' }); return local }
    let fill = fills.get(digest)
    if (fill !== undefined) {
      if (fill.isPrivate) return undefined
      // Our own fill is waiting on another node (membership views differ): the asker should not wait on us.
      if (fill.activeSource()?.kind === 'delegate') throw new FetcherBusyError(`${digest} is being fetched through another node`)
    } else {
      fill = startFill({ upstream: name, repo: parseRepoName(repo) }, digest, true)
    }
    metrics.servedForPeers.inc({ kind: 'blob' })
    const size = await raceSignal(fill.whenSized(), signal).catch((err: unknown) => { throw signal?.aborted === true ? err : mapFillError(err, digest) })
    return fillHandle(fill, size)
  }

  async function manifestForPeer (upstreamId: string, repo: string, reference: string, signal?: AbortSignal): Promise<(ManifestResult & { verifiedAt?: number }) | undefined> {
    const name = sharedById.get(upstreamId)
    if (name === undefined) return undefined
    const target: Target = { upstream: name, repo: parseRepoName(repo) }
    const ref = parseReference(reference)
    metrics.servedForPeers.inc({ kind: 'manifest' })
    const m = await manifest(target, ref, ['*/*'], signal, true)
    if (ref.kind === 'digest') return m
    const rec = await store.getTag(target.upstream, target.repo, ref.tag)
    return rec !== undefined && rec.digest === m.digest ? { ...m, verifiedAt: rec.verifiedAt } : m
  }

  async function blob (target: Target, digest: Digest, signal?: AbortSignal): Promise<BlobHandle> {
    const info = await store.stat(digest)
    if (info !== undefined) {
      metrics.cacheLookups.inc({ kind: 'blob', result: 'hit' })
      store.touch(digest, repoKey(target))
      return storeHandle(digest, info.size)
    }
    metrics.cacheLookups.inc({ kind: 'blob', result: 'miss' })
    let fill = fills.get(digest)
    if (fill === undefined) fill = startFill(target, digest)
    let size: number
    try {
      size = await raceSignal(fill.whenSized(), signal)
    } catch (err) {
      if (signal?.aborted === true) throw err
      // One fill serves a digest whatever repo asked first. If that repo's answer was "not found" or
      // "denied" (a shared base layer asked through a repo that lacks it, or is private), ours may differ:
      // ask again through our own repo before giving up.
      if (fill.repo !== repoKey(target) && (err instanceof NotFoundError || err instanceof UpstreamDeniedError)) {
        const retry = fills.get(digest) ?? startFill(target, digest)
        try {
          size = await raceSignal(retry.whenSized(), signal)
          return fillHandle(retry, size)
        } catch (err2) {
          throw (signal as AbortSignal | undefined)?.aborted === true ? err2 : mapFillError(err2, digest)
        }
      }
      throw mapFillError(err, digest)
    }
    return fillHandle(fill, size)
  }

  /**
   * Starts the one fill of `digest`. Sources, in order: peers that hold it, peers filling it now, the
   * node chosen to fetch it for the mesh (unless that is us), then the upstream. A fill for a peer
   * (`direct`) uses the upstream alone: a delegated fetch is never passed on.
   */
  function startFill (target: Target, digest: Digest, direct = false): Fill {
    const up = upstreamFor(target)
    const priv = isPrivate(up)
    const fill = new Fill(digest, store, { mediaType: 'application/octet-stream', repo: repoKey(target), private: priv })
    fills.set(digest, fill)
    metrics.fillsActive.inc()
    const upstreamSource: FillSource = {
      label: `upstream:${up.name}`,
      kind: 'upstream',
      streamable: true,
      resumable: true,
      open: async (sig, from) => {
        const r = await up.getBlob(target.repo, digest, { signal: sig, ...(from !== undefined && from.start > 0 ? { range: { start: from.start, end: from.size - 1 } } : {}) })
        return r === undefined ? undefined : { body: r.body, size: r.size, start: r.partial && from !== undefined ? from.start : 0 }
      },
    }
    const sources: FillSource[] = []
    if (!direct) {
      sources.push(...(peers?.blobSources(digest) ?? []))
      const chosen = fetcherOf(target, `blob:${digest}`, up)
      if (chosen !== undefined) sources.push(peers!.delegateBlob(chosen.fetcher, chosen.id, target.repo, digest))
    }
    // The upstream once more, to continue a transfer that broke off mid-way (a flaky link, a dead peer)
    // with a range request for the rest, instead of failing every client that already has bytes.
    sources.push(upstreamSource, { ...upstreamSource, label: `upstream:${up.name}:resume`, open: async (sig, from) => from === undefined ? undefined : await upstreamSource.open(sig, from) })
    const started = now()
    // Once its size is known, a shareable fill can be streamed by peers: tell them, so that a node that
    // misses it a moment later streams from us instead of fetching it again.
    if (!priv && peers !== undefined) {
      fill.whenSized().then(size => { if (fill.state === 'running') peers.announceFilling(digest, size) }, () => {})
    }
    void fill.run(sources, lifetime.signal).then(() => {
      fills.delete(digest)
      metrics.fillsActive.dec()
      if (!priv) peers?.fillingEnded(digest, fill.state === 'done')
      if (fill.state === 'done') {
        if (fill.source?.kind === 'peer' || fill.source?.kind === 'delegate') {
          metrics.meshHits.inc({ kind: 'blob' })
          metrics.upstreamAvoided.inc({ kind: 'blob' })
        }
        log.info({ digest, repo: repoKey(target), bytes: fill.size, ms: now() - started, source: fill.source?.label }, 'blob cached')
      } else {
        if (fill.error instanceof VerificationError) metrics.verificationFailures.inc({ source: 'upstream' })
        const e = fill.error as { code?: string, message?: string }
        log.warn({ digest, repo: repoKey(target), err: e?.code ?? e?.message, ms: now() - started }, 'blob fill failed; nothing cached')
      }
    })
    return fill
  }

  function mapFillError (err: unknown, digest: Digest): unknown {
    return err instanceof NotFoundError ? blobUnknown({ digest }) : err
  }

  return {
    manifest: async (target, ref, accept, signal) => await manifest(target, ref, accept, signal),
    blob,
    localBlob,
    blobForPeer,
    manifestForPeer,
    start () {
      if (lifetime.signal.aborted) lifetime = new AbortController()
    },
    async stop () {
      lifetime.abort(new Error('pullmesh is shutting down'))
      await Promise.allSettled([...fills.values()].map(async f => await f.whenEnded()))
    },
    activeFills: () => [...fills.keys()],
  }
}

function pickDefaultPlatform (indexBody: Buffer): Digest | undefined {
  try {
    const doc = JSON.parse(indexBody.toString('utf8')) as { manifests?: Array<{ digest?: string, platform?: { os?: string, architecture?: string } }> }
    const list = Array.isArray(doc.manifests) ? doc.manifests : []
    const best = list.find(m => m.platform?.os === 'linux' && m.platform.architecture === 'amd64') ?? list[0]
    return typeof best?.digest === 'string' ? tryParseDigest(best.digest) : undefined
  } catch {
    return undefined
  }
}

async function raceSignal<T> (p: Promise<T>, signal?: AbortSignal): Promise<T> {
  if (signal === undefined) return await p
  signal.throwIfAborted()
  let onAbort!: () => void
  const aborted = new Promise<never>((_resolve, reject) => {
    onAbort = () => reject(signal.reason)
    signal.addEventListener('abort', onAbort, { once: true })
  })
  try {
    return await Promise.race([p, aborted])
  } finally {
    signal.removeEventListener('abort', onAbort)
  }
}
