// A closed-loop HEAD load generator on raw keep-alive sockets (wrk 4.1, Debian's, waits for a body
// after a HEAD response that carries Content-Length, and stalls). Run as its own process so that it
// has a core of its own, as wrk does:
//   node head-load.mjs URL CONNECTIONS SECONDS '["Accept: ..."]'
// Prints one JSON line: { requests, rps, p50ms, p99ms, non2xx, errors }.
import { connect } from 'node:net'

const [urlArg, connArg = '50', secArg = '5', headersArg = '[]'] = process.argv.slice(2)
const url = new URL(urlArg)
const headers = JSON.parse(headersArg)
const req = Buffer.from(`HEAD ${url.pathname}${url.search} HTTP/1.1\r\nHost: ${url.host}\r\n` +
  headers.map(h => `${h}\r\n`).join('') + '\r\n')
const durationMs = Number(secArg) * 1000
const lat = []
let non2xx = 0
let errors = 0
let running = true
const t0 = performance.now()
const CRLF2 = Buffer.from('\r\n\r\n')

function client () {
  return new Promise(resolve => {
    const sock = connect(Number(url.port), url.hostname)
    sock.setNoDelay(true)
    let buf = Buffer.alloc(0)
    let sent = 0
    const send = () => {
      if (!running) { sock.destroy(); resolve(); return }
      sent = performance.now()
      sock.write(req)
    }
    sock.on('connect', send)
    sock.on('data', d => {
      buf = buf.length === 0 ? d : Buffer.concat([buf, d])
      for (;;) {
        const i = buf.indexOf(CRLF2)
        if (i < 0) return
        const status = Number(buf.toString('latin1', 9, 12))
        if (status < 200 || status >= 400) non2xx++
        lat.push(performance.now() - sent)
        buf = buf.subarray(i + 4)
        send()
      }
    })
    sock.on('error', () => { errors++ })
    sock.on('close', () => {
      if (running) { void client().then(resolve) } else resolve()
    })
  })
}

setTimeout(() => { running = false }, durationMs)
await Promise.all(Array.from({ length: Number(connArg) }, () => client()))
const elapsed = (performance.now() - t0) / 1000
lat.sort((a, b) => a - b)
const q = p => lat.length === 0 ? NaN : lat[Math.min(lat.length - 1, Math.floor(p * lat.length))]
process.stdout.write(JSON.stringify({ requests: lat.length, rps: lat.length / elapsed, p50ms: q(0.5), p99ms: q(0.99), non2xx, errors }) + '\n')
