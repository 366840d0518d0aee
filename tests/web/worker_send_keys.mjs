// The SFrame worker (client/web/worker.js) outside a browser: its message handler and a send
// transform, with one sender key's import held back. Prints {kids, dropped} as JSON: the KID
// of each frame it sent, in order, and its drops by kind.
// Usage: node worker_send_keys.mjs <client/web directory> <case>
//   "overtaken": group-send 1 (slow import), then group-send 2 (quick): a frame after both
//   "rekey": group-send 1, then group-send 2 (slow import): a frame while 2 is imported
import { pathToFileURL } from "node:url";

const [web, scenario] = process.argv.slice(2);
const url = (name) => pathToFileURL(`${web}/${name}`).href;
const { SendContext, parseHeader } = await import(url("sframe.js"));

// The import of this KID's key takes 100 ms (WebCrypto answers in no set order).
const SLOW_KID = scenario === "overtaken" ? 1n : 2n;
const addKey = SendContext.prototype.addKey;
SendContext.prototype.addKey = async function (kid, ...rest) {
  if (kid === SLOW_KID) await new Promise((resolve) => setTimeout(resolve, 100));
  return addKey.call(this, kid, ...rest);
};

const answers = [];
Object.assign(globalThis, { onmessage: null, onrtctransform: null, postMessage: (message) => answers.push(message) });
await import(url("worker.js"));

const sent = [];
const frames = new TransformStream();
const writer = frames.writable.getWriter();
onrtctransform({
  transformer: {
    options: { side: "send", kind: "video" },
    readable: frames.readable,
    writable: new WritableStream({ write: (frame) => sent.push(frame) }),
  },
});
const groupSend = (kid) => onmessage({ data: { type: "group-send", suite: 1, kid, baseKey: new Uint8Array(16).fill(kid) } });
const frame = () => writer.write({ data: new Uint8Array([1, 2, 3]).buffer });
const settled = () => new Promise((resolve) => setTimeout(resolve, 300));

if (scenario === "overtaken") {
  const first = groupSend(1);
  await groupSend(2);
  await first;
  await frame();
} else {
  await groupSend(1);
  const second = groupSend(2);
  await frame();
  await second;
}
await settled();
await onmessage({ data: { type: "audit" } });
const audit = answers.find((answer) => answer.type === "audit");
const kids = sent.map((frame) => Number(parseHeader(new Uint8Array(frame.data)).kid));
console.log(JSON.stringify({ kids, dropped: audit.dropped }));
process.exit(0);
