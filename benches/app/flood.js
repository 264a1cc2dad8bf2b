// Writes ~100-byte log lines to stdout as fast as the pipe takes them, for
// FLOOD_SECONDS (default 10), then idles. Used by the log benchmarks.
'use strict';
const line = 'x'.repeat(80);
const until = Date.now() + 1000 * Number(process.env.FLOOD_SECONDS || 10);
let seq = 0;
function pump() {
  while (Date.now() < until) {
    let chunk = '';
    for (let i = 0; i < 512; i++) chunk += `flood ${seq++} ${line}\n`;
    if (!process.stdout.write(chunk)) return process.stdout.once('drain', pump);
  }
}
if (process.send) process.send('ready');
pump();
setInterval(() => {}, 1 << 30);
