// An https.get loop over one keep-alive connection (tests/system/test_l7_tls_static.py):
// node https_get.js URL CAFILE PATH:COUNT... ; prints {"ready": true}, waits for a line on
// stdin, makes the requests one after another, prints {"200": n, "404": m} and exits when
// stdin closes.
"use strict";
const fs = require("fs");
const https = require("https");
const readline = require("readline");

const [url, caFile, ...plan] = process.argv.slice(2);
const agent = new https.Agent({ keepAlive: true, maxSockets: 1, ca: fs.readFileSync(caFile) });
const statuses = {};

function get(path) {
  return new Promise((resolve, reject) => {
    https.get(url + path, { agent }, (res) => {
      res.resume();
      res.on("end", () => resolve(res.statusCode));
    }).on("error", reject);
  });
}

async function run() {
  for (const item of plan) {
    const i = item.lastIndexOf(":");
    const path = item.slice(0, i);
    for (let n = Number(item.slice(i + 1)); n > 0; n--) {
      const status = await get(path);
      statuses[status] = (statuses[status] || 0) + 1;
    }
  }
  console.log(JSON.stringify(statuses));
}

const lines = readline.createInterface({ input: process.stdin });
let started = false;
lines.on("line", () => {
  if (!started) {
    started = true;
    run().catch((e) => { console.error(e); process.exit(1); });
  }
});
lines.on("close", () => { agent.destroy(); process.exit(0); });
console.log(JSON.stringify({ ready: true }));
