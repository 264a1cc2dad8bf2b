// The Node app every supervisor runs in the benchmarks: no dependencies, the
// shape of a typical PM2 app. It listens on the socket supd hands over (fd 3)
// when LISTEN_FDS is set, else on PORT (PM2 cluster mode shares it), says
// ready the way its supervisor expects, and on SIGINT/SIGTERM stops accepting
// and lets in-flight requests finish (Node's server.close also closes idle
// keep-alive connections, as Node apps do by default).
'use strict';
const http = require('http');
const { execFile } = require('child_process');

const instance = process.env.SUP_INSTANCE || process.env.NODE_APP_INSTANCE || '-';
const body = `pid=${process.pid} instance=${instance}\n`;

const server = http.createServer((req, res) => {
  if (req.url.startsWith('/log')) {
    // Log flood for the log benchmarks: ?n=lines per request.
    const n = Number(new URL(req.url, 'http://x').searchParams.get('n') || 1000);
    for (let i = 0; i < n; i++) process.stdout.write(`log line ${i} from ${process.pid} ${'x'.repeat(60)}\n`);
  }
  res.writeHead(200, { 'content-type': 'text/plain', 'content-length': Buffer.byteLength(body) });
  res.end(body);
});

function ready() {
  if (process.send) process.send('ready'); // PM2 wait_ready
  if (process.env.NOTIFY_SOCKET) {
    // Node has no Unix datagram sockets; systemd-notify sends READY=1 for us.
    execFile('systemd-notify', ['--ready'], () => {});
  }
}

const target = process.env.LISTEN_FDS ? { fd: 3 } : Number(process.env.PORT || 3000);
server.listen(target, ready);

function stop() {
  server.close(() => process.exit(0));
}
process.on('SIGINT', stop);
process.on('SIGTERM', stop);
process.on('message', (m) => { if (m === 'shutdown') stop(); });
