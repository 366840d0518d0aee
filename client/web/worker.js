// The W3C Encoded Transform worker: SFrame (RFC 9605) on every encoded frame, after the
// encoder and before the packetizer, and after the depacketizer and before the decoder.
// Fail closed, as client/frame_transform.py: without a send key no frame is sent; a frame
// that does not decrypt (no key, altered, replayed, not SFrame) never reaches the decoder.
//
// The page sends {type: "install", suite, installReceive?: {kid, baseKey}, switchSend?:
// {kid, baseKey}} (epoch 0 and every rekey) and {type: "retire", kids}; the worker answers
// {type: "first-use", kid} when the first frame under a receive key authenticates, and
// {type: "counters", ...} twice a second.
//
// In either call, the page's audit (audit.js) sends {type: "audit"}; the worker answers {type:
// "audit", sent: {audio, video}, given: {audio, video}, dropped: {audio, video}, sentBytes:
// {audio, video}, receivers: {label: {kind, given, passed, samples, longest}}}: the frames it
// encrypted, those it was given to send (counted as it takes each), those of them it did not
// pass on (no key yet, or encryption failed), the bytes it encrypted, and each receiver's
// frames it was given and passed on to the decoder
// (for audio, the samples those hold and the longest of them), a two-party call's receivers
// labelled by kind, a group call's slots by mid.
//
// In a group call (group.js) the page sends instead {type: "group-send", suite, kid, baseKey}
// (our sender key: every frame from now on under it), {type: "group-key", peerId, key}
// (a member's sender key: its receiver releases the frames it held), {type: "group-retire",
// peerId, below}, {type: "group-left", peerId} (its frames are refused from now on) and
// {type: "slots", owners: {mid: peerId}} (the hub's slot map); each receiving slot's transform
// decrypts under the key of the member the slot is mapped to, holding a frame whose key has not
// come for at most HOLD_MS; the worker answers {type: "group-counters", ...} twice a second.

import { ReceiveContext, SendContext } from "./sframe.js";
import { SenderKey, SenderKeyReceiver } from "./senderkeys.js";

// A held frame whose key has not come by then is dropped and counted, as client/group_call.py.
const HOLD_MS = 1000;

let sender = null;
let receiver = null;
let sendKid = null;
// Send-key switches, one after another in the order the page asked for them: an import that
// WebCrypto finishes late never brings an older key back (in a group call, one a departed
// member holds).
let switches = Promise.resolve();
// The first send key while WebCrypto imports it: a frame given meanwhile waits for it instead of
// being dropped (Chromium counts a dropped video frame as sent, audit.js).
let firstSendKey = null;

// Make `kid` the send key once `baseKey` is imported (at once if it already is), after every
// switch asked for before it. `only`: then remove every other send key (a group call's), never
// before, so that no frame is dropped while the new key is imported.
function switchSendKey(kid, baseKey, only = false) {
  const switched = switches.then(async () => {
    if (!sender.keys.has(kid)) await sender.addKey(kid, baseKey);
    sendKid = kid;
    if (only) for (const old of [...sender.keys.keys()]) if (old !== kid) sender.removeKey(old);
  });
  switches = switched.catch(() => null);
  if (sendKid === null) firstSendKey = switched;
  return switched;
}
// Totals and the same counts by media kind (the page shows the totals, each kind in a title).
const counters = { given: 0, sent: 0, dropped: 0, decrypted: 0, failed: 0, empty: 0, firstDecryptedAudio: null, reasons: {} };
const byKind = { audio: { given: 0, sent: 0, dropped: 0, decrypted: 0, failed: 0 }, video: { given: 0, sent: 0, dropped: 0, decrypted: 0, failed: 0 } };
// The bytes of the frames encrypted, by kind: the audit's measure of what may leave (audio).
const sentBytes = { audio: 0, video: 0 };
const count = (kind, name) => {
  counters[name]++;
  byKind[kind][name]++;
};
// One count of both kinds: {audio, video}.
const perKind = (name) => ({ audio: byKind.audio[name], video: byKind.video[name] });

// The group call's state: a receiver per member, the slot map, the members gone.
const group = { receivers: new Map(), owners: new Map(), departed: new Set(), holding: new Map(), firstAudio: {}, unmapped: 0, suite: null };
// Each receiver's frames, by label (a two-party call's kind, a group slot's mid): every one its
// transform was given and every one it passed on to the decoder, and for audio the samples
// those hold and the longest of them. The page compares them with what Chromium says it
// decoded (audit.js): a decoder that got more than this passed on was fed around the worker.
const receiverFrames = new Map();

// An Opus packet's length in samples at 48 kHz, from its TOC byte (RFC 6716 section 3.1): the
// frame size of its configuration times its frame count. One that does not parse counts as the
// longest packet Opus has (120 ms), so that the audit never takes it for more than it may be.
const OPUS_MAX_SAMPLES = 5_760;
function opusSamples(packet) {
  if (packet.length === 0) return OPUS_MAX_SAMPLES;
  const config = packet[0] >> 3;
  const frame = config < 12 ? [480, 960, 1920, 2880][config % 4] : config < 16 ? [480, 960][config % 2] : [120, 240, 480, 960][config % 4];
  const code = packet[0] & 3;
  const frames = code === 0 ? 1 : code < 3 ? 2 : packet.length > 1 ? packet[1] & 0x3f : 0;
  const samples = frame * frames;
  return samples > 0 && samples <= OPUS_MAX_SAMPLES ? samples : OPUS_MAX_SAMPLES;
}

// A decrypted frame, on to the decoder, counted.
function passOn(counted, frame, controller, plaintext) {
  counted.passed++;
  if (counted.kind === "audio") {
    const samples = opusSamples(plaintext);
    counted.samples += samples;
    counted.longest = Math.max(counted.longest, samples);
  }
  frame.data = plaintext.buffer;
  controller.enqueue(frame);
}

// A receiver's transform: every frame counted as given; Chromium hands its receiver's padding
// up as empty frames (nothing to decrypt, nothing to decode, and no failure); any other goes to
// `open(frame, controller, counted)`, and on to the decoder only if that returns its plaintext.
function receiving(kind, label, open) {
  const counted = { kind, given: 0, passed: 0, samples: 0, longest: 0 };
  receiverFrames.set(label, counted);
  return async (frame, controller) => {
    counted.given++;
    if (frame.data.byteLength === 0) {
      counters.empty++;
      return;
    }
    const plaintext = await open(frame, controller, counted);
    if (plaintext !== null) passOn(counted, frame, controller, plaintext);
  };
}

function memberReceiver(peerId) {
  let receiver = group.receivers.get(peerId);
  if (!receiver) {
    receiver = new SenderKeyReceiver(group.suite);
    group.receivers.set(peerId, receiver);
  }
  return receiver;
}

function decrypted(peerId, kind) {
  if (kind === "audio" && !(peerId in group.firstAudio)) group.firstAudio[peerId] = performance.timeOrigin + performance.now();
}

async function onGroupMessage(data) {
  if (data.type === "group-send") {
    group.suite = data.suite;
    if (!sender) sender = new SendContext(data.suite);
    const kid = BigInt(data.kid);
    // A KID comes back after 256 ratchet steps: only the key in use stays.
    await switchSendKey(kid, new Uint8Array(data.baseKey), true);
  } else if (data.type === "group-key") {
    if (group.departed.has(data.peerId)) return;
    const { suite, generation, step, baseKey } = data.key;
    let released;
    try {
      released = await memberReceiver(data.peerId).addKey(new SenderKey(suite, generation, step, new Uint8Array(baseKey)));
    } catch (error) {
      postMessage({ type: "log", text: `refused a sender key of ${data.peerId}: ${error.message}` });
      return;
    }
    for (const { kind, plaintext, tag } of released) {
      clearTimeout(group.holding.get(`${data.peerId} ${kind}`));
      group.holding.delete(`${data.peerId} ${kind}`);
      decrypted(data.peerId, kind);
      passOn(tag.counted, tag.frame, tag.controller, plaintext);
    }
  } else if (data.type === "group-retire") {
    const receiver = group.receivers.get(data.peerId);
    if (receiver) await receiver.retireGenerationsBelow(data.below);
  } else if (data.type === "group-left") {
    group.departed.add(data.peerId);
    group.receivers.delete(data.peerId);
  } else if (data.type === "slots") {
    group.owners = new Map(Object.entries(data.owners));
  }
}

setInterval(() => {
  if (group.suite === null) return;
  const members = {};
  for (const [peerId, receiver] of group.receivers) members[peerId] = { ...receiver.counters(), firstAudio: group.firstAudio[peerId] ?? null };
  postMessage({ type: "group-counters", sent: { ...perKind("sent"), total: counters.sent }, dropped: counters.dropped, empty: counters.empty, unmapped: group.unmapped, members });
}, 500);

onmessage = async ({ data }) => {
  if (data.type.startsWith("group-") || data.type === "slots") {
    await onGroupMessage(data);
  } else if (data.type === "install") {
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
      await switchSendKey(kid, new Uint8Array(data.switchSend.baseKey));
    }
  } else if (data.type === "retire") {
    for (const kid of data.kids) if (receiver && receiver.keys.has(BigInt(kid))) receiver.removeKey(BigInt(kid));
  } else if (data.type === "audit") {
    postMessage({ type: "audit", sent: perKind("sent"), given: perKind("given"), dropped: perKind("dropped"), sentBytes: { ...sentBytes }, receivers: Object.fromEntries([...receiverFrames].map(([label, counted]) => [label, { ...counted }])) });
  }
};

setInterval(() => postMessage({ type: "counters", ...counters, reasons: { ...counters.reasons }, audio: { ...byKind.audio }, video: { ...byKind.video } }), 500);

// The media kind is bound as SFrame metadata (RFC 9605 section 4.4.3), as the Python peer
// binds it (crypto/frame_crypto.py): a frame moved from the audio stream to the video stream
// does not authenticate.
const METADATA = { audio: new TextEncoder().encode("audio"), video: new TextEncoder().encode("video") };

const protecting = (kind) => async (frame, controller) => {
  count(kind, "given"); // before any wait: the audit compares Chromium's count with this
  if (sendKid === null && firstSendKey !== null) await firstSendKey.catch(() => null);
  if (sendKid === null) {
    count(kind, "dropped");
    return; // no key, no frame
  }
  try {
    frame.data = (await sender.protect(sendKid, new Uint8Array(frame.data), METADATA[kind])).buffer;
  } catch {
    count(kind, "dropped");
    return;
  }
  count(kind, "sent");
  sentBytes[kind] += frame.data.byteLength;
  controller.enqueue(frame);
};

// A two-party call's receiver: one per kind.
function unprotecting(kind) {
  return receiving(kind, kind, async (frame) => {
    let plaintext;
    try {
      if (!receiver) throw Object.assign(new Error("no key yet"), { kind: "UnknownKeyError" });
      plaintext = await receiver.unprotect(new Uint8Array(frame.data), METADATA[kind]);
    } catch (error) {
      count(kind, "failed");
      const reason = error.kind || "MalformedHeaderError";
      counters.reasons[reason] = (counters.reasons[reason] || 0) + 1;
      return null; // never reaches the decoder
    }
    count(kind, "decrypted");
    if (kind === "audio" && counters.firstDecryptedAudio === null) counters.firstDecryptedAudio = performance.timeOrigin + performance.now();
    return plaintext;
  });
}

// A receiving slot of a group call: whose frames it carries is the hub's word, so a frame is
// decrypted under that member's sender keys only, and one under any other key fails.
function unprotectingSlot(kind, mid) {
  return receiving(kind, mid, async (frame, controller, counted) => {
    const owner = group.owners.get(mid);
    if (owner === undefined || group.departed.has(owner) || group.suite === null) {
      group.unmapped++;
      return null;
    }
    const receiver = memberReceiver(owner);
    const plaintext = await receiver.unprotect(kind, new Uint8Array(frame.data), { frame, controller, counted });
    if (plaintext !== null) {
      decrypted(owner, kind);
      return plaintext;
    }
    const state = receiver.kinds.get(kind);
    const key = `${owner} ${kind}`;
    if (state.held.length > 0 && !group.holding.has(key)) {
      // The first frame held for a key: the rest of the wait starts with it.
      group.holding.set(key, setTimeout(() => {
        group.holding.delete(key);
        receiver.expireHeld(kind);
      }, HOLD_MS));
    }
    return null; // held for its key, or refused
  });
}

onrtctransform = ({ transformer }) => {
  const { side, kind, mid } = transformer.options;
  const transform = side === "send" ? protecting(kind) : mid !== undefined ? unprotectingSlot(kind, mid) : unprotecting(kind);
  transformer.readable.pipeThrough(new TransformStream({ transform })).pipeTo(transformer.writable);
};

// A transform made before this module has run would find no handler here (the event is not
// queued): the group call makes its transforms only after this message.
postMessage({ type: "ready" });
