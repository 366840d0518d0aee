// The W3C Encoded Transform worker: SFrame (RFC 9605) on every encoded frame, after the
// encoder and before the packetizer, and after the depacketizer and before the decoder.
// Fail closed, as client/frame_transform.py: without a send key no frame is sent; a frame
// that does not decrypt (no key, altered, replayed, not SFrame) never reaches the decoder.
//
// The page sends {type: "install", suite, installReceive?: {kid, baseKey}, switchSend?:
// {kid, baseKey}} (epoch 0 and every rekey) and {type: "retire", kids}; the worker answers
// {type: "first-use", kid} when the first frame under a receive key authenticates, and
// {type: "counters", ...} twice a second.

import { ReceiveContext, SendContext } from "./sframe.js";

let sender = null;
let receiver = null;
let sendKid = null;
// Totals and the same counts by media kind (the page shows the totals, each kind in a title).
const counters = { sent: 0, dropped: 0, decrypted: 0, failed: 0, empty: 0, firstDecryptedAudio: null, reasons: {} };
const byKind = { audio: { sent: 0, decrypted: 0, failed: 0 }, video: { sent: 0, decrypted: 0, failed: 0 } };
const count = (kind, name) => {
  counters[name]++;
  byKind[kind][name]++;
};

onmessage = async ({ data }) => {
  if (data.type === "install") {
    if (!sender) {
      sender = new SendContext(data.suite);
      receiver = new ReceiveContext(data.suite);
    }
    if (data.installReceive) {
      const kid = BigInt(data.installReceive.kid);
      await receiver.addKey(kid, new Uint8Array(data.installReceive.baseKey), (used) => postMessage({ type: "first-use", kid: Number(used) }));
    }
    if (data.switchSend) {
      const kid = BigInt(data.switchSend.kid);
      if (!sender.keys.has(kid)) await sender.addKey(kid, new Uint8Array(data.switchSend.baseKey));
      sendKid = kid;
    }
  } else if (data.type === "retire") {
    for (const kid of data.kids) if (receiver && receiver.keys.has(BigInt(kid))) receiver.removeKey(BigInt(kid));
  }
};

setInterval(() => postMessage({ type: "counters", ...counters, reasons: { ...counters.reasons }, audio: { ...byKind.audio }, video: { ...byKind.video } }), 500);

// The media kind is bound as SFrame metadata (RFC 9605 section 4.4.3), as the Python peer
// binds it (crypto/frame_crypto.py): a frame moved from the audio stream to the video stream
// does not authenticate.
const METADATA = { audio: new TextEncoder().encode("audio"), video: new TextEncoder().encode("video") };

const protecting = (kind) => async (frame, controller) => {
  if (sendKid === null) {
    counters.dropped++;
    return; // no key, no frame
  }
  try {
    frame.data = (await sender.protect(sendKid, new Uint8Array(frame.data), METADATA[kind])).buffer;
  } catch {
    counters.dropped++;
    return;
  }
  count(kind, "sent");
  controller.enqueue(frame);
};

function unprotecting(kind) {
  return async (frame, controller) => {
    // Chromium hands its receiver's padding up as empty frames: nothing to decrypt, nothing
    // to decode, and no failure.
    if (frame.data.byteLength === 0) {
      counters.empty++;
      return;
    }
    let plaintext;
    try {
      if (!receiver) throw Object.assign(new Error("no key yet"), { kind: "UnknownKeyError" });
      plaintext = await receiver.unprotect(new Uint8Array(frame.data), METADATA[kind]);
    } catch (error) {
      count(kind, "failed");
      const reason = error.kind || "MalformedHeaderError";
      counters.reasons[reason] = (counters.reasons[reason] || 0) + 1;
      return; // never reaches the decoder
    }
    frame.data = plaintext.buffer;
    count(kind, "decrypted");
    if (kind === "audio" && counters.firstDecryptedAudio === null) counters.firstDecryptedAudio = performance.timeOrigin + performance.now();
    controller.enqueue(frame);
  };
}

onrtctransform = ({ transformer }) => {
  const { side, kind } = transformer.options;
  const transform = side === "send" ? protecting(kind) : unprotecting(kind);
  transformer.readable.pipeThrough(new TransformStream({ transform })).pipeTo(transformer.writable);
};
