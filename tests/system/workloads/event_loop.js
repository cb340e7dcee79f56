// Blocks its own event loop a known number of times for a known time, when told to.
// Usage: node event_loop.js BLOCKS MS. Prints {"pid": ...} when ready; on a line "go" on
// stdin, runs BLOCKS timer callbacks that each spin MS milliseconds, 100 ms apart (the loop
// waits for I/O in between), then prints {"blocked": seconds spun, by its own clock}.
'use strict';
const readline = require('readline');

const [blocks, ms] = process.argv.slice(2).map(Number);
const spin = BigInt(Math.round(ms * 1e6));

function run() {
  let done = 0;
  let blocked = 0n;
  const step = () => {
    if (done === blocks) {
      process.stdout.write(JSON.stringify({ blocked: Number(blocked) / 1e9 }) + '\n');
      return;
    }
    done += 1;
    const t0 = process.hrtime.bigint();
    while (process.hrtime.bigint() - t0 < spin) { /* the event loop is blocked */ }
    blocked += process.hrtime.bigint() - t0;
    setTimeout(step, 100);
  };
  setTimeout(step, 100);
}

const rl = readline.createInterface({ input: process.stdin });
rl.on('line', (line) => { if (line.trim() === 'go') run(); });
rl.on('close', () => process.exit(0));
process.stdout.write(JSON.stringify({ pid: process.pid }) + '\n');
