// A reference, not a contender: the least a Node.js proxy can do. It forwards GET /v2/... to the
// upstream with undici and copies the body to the client: no hashing, no disk, no cache, no checks.
// Scenario 2 measures it beside pullmesh and distribution, so the table shows how much of a cold
// miss's gap to distribution is the Node.js stream path itself on this machine.
//   node passthrough.mjs UPSTREAM_URL PORT
import http from 'node:http'
import { pipeline } from 'node:stream'
import { request } from 'undici'

const [upstream, port] = process.argv.slice(2)
http.createServer((req, res) => {
  if (req.url === '/ready') { res.end('ok'); return }
  request(upstream + req.url, { method: 'GET' }).then(up => {
    res.writeHead(up.statusCode, { 'content-length': up.headers['content-length'], 'content-type': 'application/octet-stream' })
    pipeline(up.body, res, () => {})
  }, () => { res.statusCode = 502; res.end() })
}).listen(Number(port), '127.0.0.1')
