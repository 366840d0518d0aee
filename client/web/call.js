// One call with one remote peer: the flow of client/session.py in the browser.
//
// The key agreement (the pin check inside it); the SAS question unless the peer is already
// verified; epoch 0's keys to the SFrame worker; each side's sealed decision ("confirmed" or
// "declined"); the sealed SDP offer and answer; in the call, a sealed rekey every
// `rekeyInterval` seconds (the side that started the last one waits half as long again) and
// the sealed bye. Every failure ends the call and says why; a key the user never confirmed
// stays unpinned. Once the media flows, the connection is audited every second (audit.js):
// media that went around the worker ends the call. `ui` receives {state, ...} updates for the
// page (app.js), among them each audit's counts ({audit: {sent, slots}}, as group.js's).
//
// Routed (a group call through a hub that routes the media, client/session.py's routed mode):
// the same key agreement, pin check, SAS and sealed decisions, then straight to "in-call"
// ({keyed: true}): no pairwise media keys, no SDP, no pairwise rekeys (refused from the peer).
// The sealed channel then carries the group's sender keys ({senderKey}, {senderKeyAck} updates;
// `sendSenderKey`, `ackSenderKey`), and a failure in the call sends the bye, so that the peer
// drops this pair and the rest of the group goes on (group.js).

import { MediaAudit } from "./audit.js";
import { SerialSteps } from "./steps.js";
import { Initiator, Responder, SUITES, SUITE_NAMES, fingerprint, randomBytes } from "./protocol.js";
import { pins } from "./store.js";

const CALL_ID_BYTES = 16;
const SETUP_TIMEOUT = 30_000;
const REKEY_INTERVAL = 60_000;
const REKEY_TIMEOUT = 10_000;
const REQUESTER_REKEY_FACTOR = 1.5;
const GRACE = 2_000;
const MAX_RECEIVE_KEYS = 2;
// The RTP header extensions negotiated (client/rtp_policy.py): none reveals media content.
const CLEAR_HEADER_EXTENSIONS = new Set(["urn:ietf:params:rtp-hdrext:sdes:mid", "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"]);

// Opus at a constant 32 kbit/s (client/rtp_policy.py's AUDIO_BITRATE): every 20 ms frame has
// the same size, whatever is said. An Opus encoder follows the parameters in the description
// of the side that receives (RFC 7587 section 7), so both our own descriptions and the peer's
// are given them: the Python peer's carry none (aiortc fixes its own encoder).
const OPUS_PARAMETERS = { cbr: "1", maxaveragebitrate: "32000", usedtx: "0" };

// The session description a blindhub peer applies, its own or the peer's: no RTP header
// extension that is not allowed in clear, and constant-bitrate Opus.
export function mediaPolicy(sdp) {
  const lines = sdp.split(/(?<=\r\n)/).filter((line) => !line.startsWith("a=extmap:") || CLEAR_HEADER_EXTENSIONS.has(line.slice(9).split(/\s+/)[1]));
  const opus = new Set(lines.map((line) => /^a=rtpmap:(\d+) opus\/48000/i.exec(line)).filter(Boolean).map((found) => found[1]));
  const fmtp = new Set();
  const result = lines.map((line) => {
    const found = /^a=fmtp:(\d+) (.*?)(\r\n)?$/.exec(line);
    if (!found || !opus.has(found[1])) return line;
    fmtp.add(found[1]);
    return `a=fmtp:${found[1]} ${opusParameters(found[2])}${found[3] || ""}`;
  });
  // An Opus payload type without parameters gets its own line, after its rtpmap.
  return result
    .flatMap((line) => {
      const found = /^a=rtpmap:(\d+) opus\/48000/i.exec(line);
      return found && !fmtp.has(found[1]) ? [line, `a=fmtp:${found[1]} ${opusParameters("")}\r\n`] : [line];
    })
    .join("");
}

function opusParameters(given) {
  const parameters = new Map(
    given
      .split(";")
      .map((item) => item.trim())
      .filter(Boolean)
      .map((item) => [item.split("=")[0].trim().toLowerCase(), item.slice(item.indexOf("=") + 1).trim()]),
  );
  for (const [name, value] of Object.entries(OPUS_PARAMETERS)) parameters.set(name, value);
  return Array.from(parameters, ([name, value]) => `${name}=${value}`).join(";");
}

const hex = (bytes) => Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");

export class CallEnded extends Error {
  constructor(kind, message) {
    super(message);
    this.kind = kind;
  }
}

export class Call {
  constructor({ hub, peerId, initiator, identity, name, localStream, ui, joinTime, routed = false }) {
    Object.assign(this, { hub, peerId, initiator, identity, name, localStream, ui, joinTime, routed });
    this.state = "key-agreement";
    this.handshake = null;
    this.result = null;
    this.newPin = null;
    this.peerConfirmed = false;
    this.receiveKids = [];
    this.requestedRekey = false;
    this.steps = new SerialSteps({
      stopped: () => this.state === "ended",
      failed: (error) => this.fail(error.kind || "CallFailed", error.message),
    });
    this.audit = null;
    // A routed call's frames go through the group's worker, under sender keys.
    this.worker = routed ? null : new Worker("worker.js", { type: "module", name: "sframe" });
    if (this.worker) this.worker.onmessage = ({ data }) => this.onWorker(data);
    this.counters = { sent: 0, decrypted: 0, failed: 0 };
    this.setupTimer = this.steps.after(SETUP_TIMEOUT, () => this.fail("CallFailed", "the call was not set up in time"));
  }

  send(payload) {
    this.hub.relay(this.peerId, payload);
  }

  update(fields) {
    this.ui({ peerId: this.peerId, state: this.state, ...fields });
  }

  // -- events from the page and the hub

  start() {
    return this.steps.run(async () => {
      this.update({});
      if (!this.initiator) return;
      const callId = hex(randomBytes(CALL_ID_BYTES));
      this.handshake = new Initiator(this.identity, callId, SUITES, randomBytes, { name: this.name, peerCheck: (n, k) => this.checkPeer(n, k) });
      this.send(await this.handshake.start());
    });
  }

  receive(payload) {
    return this.steps.run(async () => {
      if (this.state === "key-agreement") return this.onKeyAgreement(payload);
      if (this.state === "await-sas" || this.state === "await-peer") return this.onDecision(payload);
      if (this.state === "negotiating") return this.onNegotiation(payload);
      if (this.state === "in-call") return this.onCallMessage(payload);
    });
  }

  sasAnswer(accepted) {
    return this.steps.run(async () => {
      if (this.state !== "await-sas") return;
      if (!accepted) {
        this.send(await this.result.channel.seal({ type: "declined" }));
        return this.fail("VerificationRefused", "the SAS was not confirmed");
      }
      await pins.markVerified(this.result.peerName);
      this.newPin = null;
      this.pin = "VERIFIED";
      return this.accept();
    });
  }

  hangup(reason = "hangup") {
    return this.steps.run(async () => {
      if (this.state !== "in-call") return this.fail("CallFailed", "hung up before the call was set up");
      try {
        this.send(await this.result.channel.seal({ type: "bye" }));
      } catch {
        // the hub is gone: the peer sees the connection close
      }
      return this.end(reason);
    });
  }

  peerLeft() {
    return this.steps.run(async () => (this.state === "in-call" ? this.end("peer-left") : this.fail("CallFailed", "the peer left during setup")));
  }

  // -- the key agreement

  async checkPeer(name, key) {
    if (hex(key) === hex(this.identity.publicKey)) {
      throw new CallEnded("CallWithSelf", `the peer '${name}' signed with our own identity key: the hub connected this call to another of our own`);
    }
    const { pin, isNew } = await pins.check(name, key);
    if (isNew) this.newPin = name;
    this.pin = isNew ? "NEW" : pin.verified ? "VERIFIED" : "PINNED";
  }

  async onKeyAgreement(payload) {
    if (this.handshake === null) {
      if (payload === null || typeof payload !== "object" || payload.type !== "commit" || typeof payload.call_id !== "string") {
        return this.fail("CallFailed", `expected 'commit' from the peer, got '${payload && payload.type}'`);
      }
      this.handshake = new Responder(this.identity, payload.call_id, SUITES, randomBytes, { name: this.name, peerCheck: (n, k) => this.checkPeer(n, k) });
    }
    let replies;
    try {
      replies = await this.handshake.receive(payload);
    } catch (error) {
      if (error.kind === "PinnedIdentityMismatch") {
        // The warning, in the roster too: the name it signed, CHANGED, the key it presented.
        this.update({ peerName: error.name, fingerprint: error.presented, pin: "CHANGED" });
        return this.fail("IdentityMismatch", error.message);
      }
      if (error.kind === "CallWithSelf") return this.fail("IdentityMismatch", error.message);
      return this.fail("CallFailed", `key agreement failed: ${error.kind || "error"}: ${error.message}`);
    }
    for (const reply of replies) this.send(reply);
    if (this.handshake.state !== "done") return;
    const result = (this.result = this.handshake.result);
    this.fingerprint = await fingerprint(result.peerIdentity);
    this.protection = { suite: SUITE_NAMES[result.suite], peerName: result.peerName, fingerprint: this.fingerprint, sas: result.sas };
    if (this.pin !== "VERIFIED") {
      this.state = "await-sas";
      return this.update({ ...this.protection, pin: this.pin, askSas: true });
    }
    return this.accept();
  }

  // We accept the peer: key the call, tell the peer, negotiate once it accepted us too.
  async accept() {
    if (!this.routed) this.install(this.result.initialKeys);
    this.send(await this.result.channel.seal({ type: "confirmed" }));
    this.state = "await-peer";
    this.update({ ...this.protection, pin: this.pin, askSas: false });
    if (this.peerConfirmed) await this.negotiate();
  }

  async onDecision(payload) {
    let content;
    try {
      content = (await this.result.channel.open(payload)).content;
    } catch (error) {
      return this.fail("CallFailed", `a sealed setup message was rejected: ${error.kind}: ${error.message}`);
    }
    const decision = content && content.type;
    if (decision === "declined") return this.fail("VerificationRefused", `${this.result.peerName} did not confirm the SAS`);
    if (decision !== "confirmed" || this.peerConfirmed) return this.fail("CallFailed", `expected the peer's decision, got '${decision}'`);
    this.peerConfirmed = true;
    if (this.state === "await-peer") await this.negotiate();
  }

  // -- the media negotiation

  async negotiate() {
    if (this.routed) {
      // No media of ours flows through this pair: the call starts now.
      this.state = "in-call";
      this.steps.cancel(this.setupTimer);
      this.setupTimer = null;
      return this.update({ ...this.protection, pin: this.pin, keyed: true });
    }
    this.state = "negotiating";
    this.steps.cancel(this.setupTimer);
    this.setupTimer = this.steps.after(SETUP_TIMEOUT, () => this.fail("CallFailed", "the media was not set up in time"));
    this.update({ ...this.protection, pin: this.pin });
    if (!this.initiator) return;
    const pc = this.newConnection();
    for (const track of this.localStream.getTracks()) pc.addTrack(track, this.localStream);
    this.preferCodecs(pc);
    this.installTransforms(pc);
    const offer = await pc.createOffer();
    await pc.setLocalDescription({ type: "offer", sdp: mediaPolicy(offer.sdp) });
    await this.gathered(pc);
    this.send(await this.result.channel.seal({ type: "offer", sdp: pc.localDescription.sdp }));
  }

  async onNegotiation(payload) {
    let content;
    try {
      content = (await this.result.channel.open(payload)).content;
    } catch (error) {
      return this.fail("CallFailed", `a sealed setup message was rejected: ${error.kind}: ${error.message}`);
    }
    const expected = this.initiator ? "answer" : "offer";
    if (!content || content.type !== expected) return this.fail("CallFailed", `expected '${expected}' from the peer, got '${content && content.type}'`);
    if (typeof content.sdp !== "string") return this.fail("CallFailed", "the peer's session description is missing");
    if (this.initiator) {
      await this.pc.setRemoteDescription({ type: "answer", sdp: mediaPolicy(content.sdp) });
      return this.mediaStarted();
    }
    const pc = this.newConnection();
    await pc.setRemoteDescription({ type: "offer", sdp: mediaPolicy(content.sdp) });
    // addTrack takes the offer's transceiver of the track's kind, as aiortc's does; a kind
    // this side has no track of is answered receive-only.
    for (const track of this.localStream.getTracks()) pc.addTrack(track, this.localStream);
    this.preferCodecs(pc);
    this.installTransforms(pc);
    const answer = await pc.createAnswer();
    await pc.setLocalDescription({ type: "answer", sdp: mediaPolicy(answer.sdp) });
    await this.gathered(pc);
    this.send(await this.result.channel.seal({ type: "answer", sdp: pc.localDescription.sdp }));
    return this.mediaStarted();
  }

  newConnection() {
    this.pc = new RTCPeerConnection({ iceServers: [] });
    this.pc.ontrack = (event) => this.update({ remoteStream: event.streams[0] || new MediaStream([event.track]) });
    this.pc.onconnectionstatechange = () => {
      if (["failed", "closed"].includes(this.pc.connectionState)) this.steps.run(() => this.end(`connection-${this.pc.connectionState}`));
    };
    return this.pc;
  }

  // Opus only (the codec both peers frame the same way); VP8 for the video sections, without
  // RTX: Chromium probes the bandwidth by resending recent video packets on the RTX stream, and
  // a receiving Chromium then assembles some frames a second time, which anti-replay drops as
  // failures. Lost packets are still resent (NACK), on the video stream itself.
  preferCodecs(pc) {
    for (const transceiver of pc.getTransceivers()) {
      const kind = transceiver.receiver.track.kind;
      const { codecs } = RTCRtpReceiver.getCapabilities(kind);
      const wanted = kind === "audio" ? ["audio/opus"] : ["video/VP8"];
      transceiver.setCodecPreferences(codecs.filter((codec) => wanted.includes(codec.mimeType)));
    }
  }

  // SFrame on every sender and receiver before any media can flow.
  // Called in the task that created the transceivers, before any await: Chromium short-circuits
  // for good the encoded transform of a sender or receiver still without one when it ends.
  installTransforms(pc) {
    for (const transceiver of pc.getTransceivers()) {
      const kind = transceiver.receiver.track.kind;
      transceiver.sender.transform = new RTCRtpScriptTransform(this.worker, { side: "send", kind });
      transceiver.receiver.transform = new RTCRtpScriptTransform(this.worker, { side: "receive", kind });
    }
  }

  async gathered(pc) {
    // No trickle ICE: every candidate travels inside the sealed description.
    const start = performance.now();
    await new Promise((resolve) => {
      if (pc.iceGatheringState === "complete") return resolve();
      pc.addEventListener("icegatheringstatechange", () => pc.iceGatheringState === "complete" && resolve());
    });
    this.update({ log: `ICE candidates gathered in ${(performance.now() - start).toFixed(0)} ms` });
  }

  mediaStarted() {
    this.state = "in-call";
    this.steps.cancel(this.setupTimer);
    this.setupTimer = null;
    this.requestedRekey = !this.initiator;
    this.scheduleRekey();
    const pc = this.pc;
    this.audit = new MediaAudit({
      pc,
      worker: this.worker,
      // The worker labels our receivers by kind: one transceiver of each kind.
      receivers: (byKind) => Object.fromEntries(pc.getTransceivers().map((transceiver) => [transceiver.mid, byKind[transceiver.receiver.track.kind]]).filter(([, counted]) => counted)),
      audited: (audit) => this.update({ audit }),
      bypassed: (message) => this.steps.run(() => this.fail("CallFailed", message)),
    });
    this.audit.start();
    this.update({ ...this.protection, pin: this.pin });
  }

  // -- keys

  install(keys) {
    const message = { type: "install", suite: this.result.suite };
    if (keys.installReceive) {
      message.installReceive = { kid: keys.installReceive.kid, baseKey: keys.installReceive.baseKey };
      this.receiveKids.push(keys.installReceive.kid);
      if (this.receiveKids.length > MAX_RECEIVE_KEYS) {
        this.worker.postMessage({ type: "retire", kids: this.receiveKids.slice(0, -MAX_RECEIVE_KEYS) });
        this.receiveKids = this.receiveKids.slice(-MAX_RECEIVE_KEYS);
      }
    }
    if (keys.switchSend) {
      message.switchSend = { kid: keys.switchSend.kid, baseKey: keys.switchSend.baseKey };
      this.epoch = keys.switchSend.kid >> 1;
    }
    this.worker.postMessage(message);
  }

  onWorker(data) {
    if (data.type === "counters") {
      this.counters = data;
      this.update({ counters: data, setupMs: data.firstDecryptedAudio === null ? null : data.firstDecryptedAudio - this.joinTime });
    } else if (data.type === "audit" && this.audit) {
      this.audit.answered(data);
    } else if (data.type === "first-use") {
      // The peer switched to its newest key: older ones serve only frames in flight.
      const kids = this.receiveKids;
      if (kids.length >= 2 && data.kid === kids[kids.length - 1]) {
        this.receiveKids = [data.kid];
        setTimeout(() => this.worker.postMessage({ type: "retire", kids: kids.slice(0, -1) }), GRACE);
      }
    }
  }

  scheduleRekey() {
    this.steps.cancel(this.rekeyTimer);
    const delay = REKEY_INTERVAL * (this.requestedRekey ? REQUESTER_REKEY_FACTOR : 1);
    this.rekeyTimer = this.steps.after(delay, () => this.rekey());
  }

  async rekey() {
    const channel = this.result.channel;
    if (this.state !== "in-call" || channel.rekeyInProgress) return;
    this.send(await channel.startRekey());
    this.requestedRekey = true;
    this.rekeyDeadline = this.steps.after(REKEY_TIMEOUT, () => this.fail("CallFailed", `a rekey did not complete within ${REKEY_TIMEOUT / 1000} s`));
  }

  async onCallMessage(payload) {
    const channel = this.result.channel;
    let received;
    try {
      received = await channel.open(payload);
    } catch (error) {
      if (error.kind === "SealedGap" || error.kind === "SealedReorder") return this.fail("CallFailed", `a sealed message was lost: ${error.message}`);
      // A forged or replayed copy changes nothing: count it.
      this.update({ log: `dropped a sealed message that did not open: ${error.kind}` });
      return;
    }
    const pairwiseRekey = received.replies.length > 0 || Boolean(received.keys.installReceive || received.keys.switchSend);
    const groupKeys = received.senderKey !== undefined || received.senderKeyAck !== undefined;
    if (this.routed && pairwiseRekey) return this.fail("CallFailed", "the peer started a pairwise rekey in a routed call");
    if (!this.routed && groupKeys) return this.fail("CallFailed", "the peer sent a group sender key in a two-party call");
    if (received.senderKey !== undefined) this.update({ senderKey: received.senderKey });
    if (received.senderKeyAck !== undefined) this.update({ senderKeyAck: received.senderKeyAck });
    for (const reply of received.replies) this.send(reply);
    if (received.keys.installReceive || received.keys.switchSend) this.install(received.keys);
    if (received.keys.switchSend) this.update({ log: `rekeyed: now epoch ${this.epoch}` });
    if (channel.rekeyInProgress && !this.rekeyDeadline) {
      this.requestedRekey = false;
      this.steps.cancel(this.rekeyTimer);
      this.rekeyDeadline = this.steps.after(REKEY_TIMEOUT, () => this.fail("CallFailed", "a rekey did not complete in time"));
    } else if (!channel.rekeyInProgress && this.rekeyDeadline) {
      this.steps.cancel(this.rekeyDeadline);
      this.rekeyDeadline = null;
      this.scheduleRekey();
    }
    if (received.content && received.content.type === "bye") return this.end("peer-bye");
  }

  // -- group sender keys (routed calls only)

  sendSenderKey(key) {
    return this.steps.run(async () => {
      if (this.state === "in-call") this.send(await this.result.channel.sealSenderKey(key));
    });
  }

  ackSenderKey(kid) {
    return this.steps.run(async () => {
      if (this.state === "in-call") this.send(await this.result.channel.sealSenderKeyAck(kid));
    });
  }

  // Ends this pair from outside (the group refuses it), as a failure.
  abort(kind, message) {
    return this.steps.run(() => this.fail(kind, message));
  }

  // -- the end

  async fail(kind, message) {
    if (this.state === "ended") return;
    if (this.routed && this.state === "in-call") {
      // Only this pair ends: the bye makes the peer drop us too (and move to a sender key we
      // never get) instead of handing keys to a member that no longer takes them.
      try {
        this.send(await this.result.channel.seal({ type: "bye" }));
      } catch {
        // the hub is gone: the group call is over anyway
      }
    }
    if (this.newPin !== null && this.state !== "in-call") {
      // Never accepted: a key the user did not confirm stays unpinned.
      await pins.remove(this.newPin);
      this.newPin = null;
    }
    this.close();
    this.update({ error: { kind, message } });
  }

  end(reason) {
    if (this.state === "ended") return;
    this.close();
    this.update({ ended: reason });
  }

  close() {
    this.state = "ended";
    this.steps.stop();
    if (this.audit) this.audit.stop();
    if (this.pc) this.pc.close();
    if (this.worker) this.worker.terminate();
  }
}
