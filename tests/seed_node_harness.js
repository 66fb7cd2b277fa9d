// Runs the Node.js classes of "How to Implement Device State Management with Redis", read from
// the document at run time, and answers calls from the Python tests over stdin/stdout.
//
//   node seed_node_harness.js DOCUMENT REDIS_URL
//   in:  {"id": 1, "target": "manager" | "detector", "method": "deviceHeartbeat", "args": [...]}
//        {"id": 2, "target": "manager", "method": "subscribeToPresence"}   (events follow)
//        {"id": 3, "target": "manager", "set": "heartbeatTimeout", "value": 2}   (a property)
//   out: {"id": 1, "result": ...} | {"id": 1, "error": "..."} | {"event": {...}}
//
// Only the class definitions run: the document's usage example (which would talk to a Redis on
// localhost:6379) is cut off at its "// Usage" comment. The classes log with console.log: their
// console writes to stderr, so stdout carries nothing but this protocol's lines.
'use strict';
const fs = require('fs');
const readline = require('readline');

const [documentPath, redisUrl] = process.argv.slice(2);
const text = fs.readFileSync(documentPath, 'utf8');
const fence = /^```javascript[ \t]*\n([\s\S]*?)^```[ \t]*$/m.exec(text);
if (!fence) throw new Error(`no javascript block in ${documentPath}`);
const parts = fence[1].split(/^\/\/ Usage[ \t]*$/m);
if (parts.length < 2) throw new Error('the javascript block has no "// Usage" section to cut');
const body = `${parts[0]}\nreturn { DeviceStateManager, OfflineDetector };`;
const load = new Function('require', 'console', body);
const { DeviceStateManager, OfflineDetector } = load(require, new console.Console(process.stderr));

const targets = {
  manager: new DeviceStateManager(redisUrl),
  detector: new OfflineDetector(redisUrl),
};
const write = (message) => process.stdout.write(`${JSON.stringify(message)}\n`);

readline.createInterface({ input: process.stdin }).on('line', async (line) => {
  const call = JSON.parse(line);
  try {
    const target = targets[call.target];
    let result;
    if (call.set !== undefined) {
      target[call.set] = call.value;
      result = null;
    } else if (call.method === 'subscribeToPresence') {
      target.subscribeToPresence((event) => write({ event }));
      result = null;
    } else {
      result = await target[call.method](...(call.args || []));
    }
    write({ id: call.id, result: result === undefined ? null : result });
  } catch (error) {
    write({ id: call.id, error: String(error && error.message ? error.message : error) });
  }
});
