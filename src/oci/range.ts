import { OciError } from '../errors.js'

/** An inclusive byte range, already checked against the blob's size. */
export interface ByteRange { start: number, end: number }

/**
 * Parses a single-range `Range` header against a blob of `size` bytes.
 * Returns undefined when no header was sent. Throws RANGE_INVALID 400 for a malformed header
 * or a multi-range request, and 416 (with Content-Range) for an unsatisfiable one.
 */
export function parseRange (header: string | undefined, size: number): ByteRange | undefined {
  if (header === undefined) return undefined
  const m = /^bytes=(\d*)-(\d*)$/.exec(header.trim())
  if (m === null) {
    const multi = /^bytes=[\d\s,-]+$/.test(header.trim()) && header.includes(',')
    throw new OciError('RANGE_INVALID', 400, multi ? 'multiple ranges are not supported' : 'malformed Range header', { range: header.slice(0, 100) })
  }
  const [, a = '', b = ''] = m
  if (a === '' && b === '') throw new OciError('RANGE_INVALID', 400, 'malformed Range header', { range: header })
  if (a.length > 15 || b.length > 15) throw unsatisfiable(header, size)
  let start: number
  let end: number
  if (a === '') {
    const suffix = Number(b)
    if (suffix === 0) throw unsatisfiable(header, size)
    start = Math.max(0, size - suffix)
    end = size - 1
  } else {
    start = Number(a)
    end = b === '' ? size - 1 : Math.min(Number(b), size - 1)
    if (b !== '' && Number(b) < start) throw new OciError('RANGE_INVALID', 400, 'malformed Range header: end before start', { range: header })
  }
  if (start >= size || size === 0) throw unsatisfiable(header, size)
  return { start, end }
}

function unsatisfiable (header: string, size: number): OciError {
  return new OciError('RANGE_INVALID', 416, 'requested range not satisfiable', { range: header.slice(0, 100), size }, { 'content-range': `bytes */${size}` })
}

export function contentRange (r: ByteRange, size: number): string {
  return `bytes ${r.start}-${r.end}/${size}`
}
