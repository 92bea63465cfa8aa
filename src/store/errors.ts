/** `readBuffer` was asked for a blob larger than the caller's limit. */
export class BlobTooLargeError extends Error {
  override readonly name = 'BlobTooLargeError'
  readonly code = 'PM_BLOB_TOO_LARGE'
  constructor (readonly digest: string, readonly size: number, readonly maxBytes: number) {
    super(`blob is ${size} bytes, more than the limit of ${maxBytes}`)
  }
}

/** The store was used before `start()` or after `stop()`. */
export class StoreClosedError extends Error {
  override readonly name = 'StoreClosedError'
  readonly code = 'PM_STORE_CLOSED'
  constructor () {
    super('the blob store is not started')
  }
}
