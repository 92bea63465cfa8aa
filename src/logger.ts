import { pino, type Logger, type LevelWithSilent, type DestinationStream } from 'pino'

export type { Logger }

/** Paths that must never reach a log line. */
export const REDACT_PATHS = [
  'authorization', '*.authorization', 'headers.authorization', 'req.headers.authorization',
  'req.headers["proxy-authorization"]', 'res.headers["www-authenticate"]',
  'token', '*.token', 'access_token', '*.access_token', 'password', '*.password', 'credentials', '*.credentials',
]

export function createLogger (level: LevelWithSilent, destination?: DestinationStream): Logger {
  return pino({
    level,
    base: { service: 'pullmesh' },
    redact: { paths: REDACT_PATHS, censor: '[redacted]' },
    timestamp: pino.stdTimeFunctions.isoTime,
  }, destination)
}
