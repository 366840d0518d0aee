// A group call through a hub that routes the media: client/group_session.py's schedule and
// client/group_call.py's media, in the browser.
//
// One routed Call (call.js) per remote peer: the same key agreement, pins, SAS and sealed
// decision as a two-party call; the member already in the room starts it. A peer becomes a
// member once its pair is keyed, and only then gets our sender key; a peer whose pair fails
// before that is dropped alone and never gets one. Our sender key (senderkeys.js):
// - the first is generation 0, step 0, used at once;
// - a member joined: the current key (and a leave's pending one) ratchet one step, the joiner
//   gets them, and we send under the ratcheted current key at once (the others follow the
//   ratchet; the joiner holds our frames until its key comes);
// - a member left: a pending fresh key of the next generation for every remaining member,
//   switched to once all acknowledged it or SWITCH_BOUND after the first leave not yet in use;
// - a member that does not acknowledge a key within REKEY_TIMEOUT is dropped.
// Every member's key is acknowledged and added to its receiver in the worker; its older
// generations are retired GRACE later. The roster and the group security code are shown after
// every change. The media: the hub offers, we answer, our tracks on its first audio and video
// transceivers and every other one receive-only, each a slot the hub maps to a member.
//
// `ui` receives the pairs' updates ({peerId, state, ...}, as call.js's) and the group's:
// {roster: [{peerId, name, fingerprint, status}]}, {code}, {counters}, {slotTrack: {mid,
// kind, track}}, {slots: {mid: peerId}}, {audit: {sent: {kind: {left, encrypted}}, slots: {mid:
// {kind, packets, given, passed, decoded, allowed}}}}, {memberLeft: peerId}, {log}, {ended},
// {error}.
//
// The media connection is audited every second (audit.js), each slot by its mid: media that
// went around the worker ends the call.

import { MediaAudit } from "./audit.js";
import { Call, mediaPolicy } from "./call.js";
import { SUITES, SUITE_NAMES, randomBytes } from "./protocol.js";
import { SenderKey, groupSecurityCode } from "./senderkeys.js";
import { SerialSteps } from "./steps.js";

const SWITCH_BOUND = 500;
const REKEY_TIMEOUT = 10_000;
const GRACE = 2_000;

export class GroupCall {
  constructor({ hub, identity, name, localStream, ui, joinTime }) {
    Object.assign(this, { hub, identity, name, localStream, ui, joinTime });
    this.suite = SUITES[0];
    this.peers = new Map(); // peerId -> {call, member, protection, identity, generation, awaitedKid, ackTimer}
    this.current = SenderKey.fresh(this.suite, 0, randomBytes);
    this.pending = null;
    this.pendingSince = 0;
    this.awaiting = new Set();
    this.ended = false;
    this.steps = new SerialSteps({
      stopped: () => this.ended,
      failed: (error) => this.ui({ log: `group call error: ${error.message}` }),
    });
    this.shownRoster = "";
    this.code = null;
    this.pc = null;
    this.audit = null;
    this.worker = new Worker("worker.js", { type: "module", name: "sframe" });
    this.workerReady = new Promise((resolve) => {
      this.onWorkerReady = resolve;
    });
    this.worker.onmessage = ({ data }) => {
      if (data.type === "ready") this.onWorkerReady();
      else if (data.type === "group-counters") this.ui({ counters: data });
      else if (data.type === "log") this.ui({ log: data.text });
      else if (data.type === "audit" && this.audit) this.audit.answered(data);
    };
  }

  get suiteName() {
    return SUITE_NAMES[this.suite];
  }

  // -- events from the page and the hub

  start(peers) {
    return this.steps.run(async () => {
      this.useSendKey(this.current);
      for (const peerId of peers) this.addPeer(peerId, false);
      await this.refresh();
    });
  }

  peerJoined(peerId) {
    return this.steps.run(() => this.addPeer(peerId, true));
  }

  peerLeft(peerId) {
    const state = this.peers.get(peerId);
    if (state) state.call.peerLeft();
  }

  relay(from, payload) {
    const state = this.peers.get(from);
    if (state) state.call.receive(payload);
  }

  sasAnswer(peerId, accepted) {
    const state = this.peers.get(peerId);
    if (state) state.call.sasAnswer(accepted);
  }

  hangup(reason = "hangup") {
    return this.steps.run(async () => {
      await Promise.all([...this.peers.values()].map(({ call }) => call.hangup(reason)));
      this.end({ ended: reason });
    });
  }

  hubClosed() {
    return this.steps.run(() => this.end({ error: { kind: "CallFailed", message: "the hub connection was lost: it carries the media of a group call" } }));
  }

  // -- the pairs

  addPeer(peerId, initiator) {
    if (this.peers.has(peerId)) return;
    const call = new Call({ hub: this.hub, peerId, initiator, identity: this.identity, name: this.name, localStream: this.localStream, ui: (update) => this.onPair(update), joinTime: this.joinTime, routed: true });
    this.peers.set(peerId, { call, member: false, protection: null, identity: null, generation: null, awaitedKid: null, ackTimer: null });
    call.start();
  }

  onPair(update) {
    const { peerId } = update;
    this.ui(update);
    if (update.keyed) this.steps.run(() => this.joined(peerId));
    if (update.senderKey) this.steps.run(() => this.keyArrived(peerId, update.senderKey));
    if (update.senderKeyAck !== undefined) this.steps.run(() => this.acked(peerId, update.senderKeyAck));
    if (update.error || update.ended) this.steps.run(() => this.gone(peerId, update.ended || update.error.kind));
  }

  async joined(peerId) {
    const state = this.peers.get(peerId);
    if (!state) return;
    const { call } = state;
    const identity = call.result.peerIdentity;
    const same = [...this.peers.values()].find((other) => other.member && other.identity.every((byte, i) => byte === identity[i]));
    if (same) {
      // One identity, one member: the roster and the security code list each key once.
      return call.abort("CallFailed", `${call.result.peerName}'s identity key is already in the call, as ${same.protection.peerName}`);
    }
    Object.assign(state, { member: true, identity, protection: { ...call.protection, pin: call.pin, fingerprint: call.fingerprint } });
    this.ui({ log: `${call.result.peerName} joined (${call.pin}, ${call.fingerprint})` });
    this.current = await this.current.ratcheted();
    this.useSendKey(this.current);
    this.giveKey(peerId, state, this.current);
    if (this.pending) {
      this.pending = await this.pending.ratcheted();
      this.giveKey(peerId, state, this.pending);
    }
    await this.refresh();
  }

  giveKey(peerId, state, key) {
    state.awaitedKid = key.kid;
    if (state.ackTimer === null) {
      state.ackTimer = this.steps.after(REKEY_TIMEOUT, () => state.call.abort("CallFailed", `our sender key was not acknowledged within ${REKEY_TIMEOUT / 1000} s`));
    }
    state.call.sendSenderKey(key);
  }

  async keyArrived(peerId, key) {
    const state = this.peers.get(peerId);
    if (!state || !state.member) return;
    if (key.suite !== this.suite || (state.generation !== null && key.generation <= state.generation)) {
      // Authentic, yet not what an honest member sends: unacknowledged, and refused.
      this.ui({ log: `dropped a sender key from ${state.protection.peerName} that does not fit (generation ${key.generation})` });
      return;
    }
    if (state.generation !== null) this.steps.after(GRACE, () => this.worker.postMessage({ type: "group-retire", peerId, below: key.generation }));
    state.generation = key.generation;
    this.worker.postMessage({ type: "group-key", peerId, key: { suite: key.suite, generation: key.generation, step: key.step, baseKey: key.baseKey } });
    state.call.ackSenderKey(new SenderKey(key.suite, key.generation, key.step, key.baseKey).kid);
    await this.refresh();
  }

  async acked(peerId, kid) {
    const state = this.peers.get(peerId);
    if (!state || kid !== state.awaitedKid) return; // an older key's ack: the newer one's is due
    state.awaitedKid = null;
    this.steps.cancel(state.ackTimer);
    state.ackTimer = null;
    this.awaiting.delete(peerId);
    await this.refresh();
  }

  async gone(peerId, reason) {
    const state = this.peers.get(peerId);
    if (!state) return;
    this.peers.delete(peerId);
    this.awaiting.delete(peerId);
    clearTimeout(state.ackTimer);
    this.worker.postMessage({ type: "group-left", peerId });
    this.ui({ memberLeft: peerId });
    if (!state.member) {
      this.ui({ log: `${peerId} was not admitted (${reason}): it got no key` });
      return;
    }
    this.ui({ log: `${state.protection.peerName} left (${reason})` });
    // A member that held our key is gone: a fresh generation for everyone else.
    if (this.pending === null) {
      this.pendingSince = performance.now();
      this.steps.after(SWITCH_BOUND, () => this.refresh());
    }
    this.pending = SenderKey.fresh(this.suite, (this.pending || this.current).generation + 1, randomBytes);
    this.awaiting = new Set();
    for (const [other, otherState] of this.peers) {
      if (!otherState.member) continue;
      this.awaiting.add(other);
      this.giveKey(other, otherState, this.pending);
    }
    await this.refresh();
  }

  useSendKey(key) {
    this.worker.postMessage({ type: "group-send", suite: key.suite, kid: key.kid, baseKey: key.baseKey });
  }

  // After every event: the switch if it is due, then the roster and the code, if changed.
  async refresh() {
    if (this.ended) return;
    // (Less 1 ms: the bound's timer may run a fraction of one before performance.now() shows it.)
    if (this.pending !== null && (this.awaiting.size === 0 || performance.now() >= this.pendingSince + SWITCH_BOUND - 1)) {
      if (this.awaiting.size > 0) this.ui({ log: `sending under generation ${this.pending.generation} without every acknowledgement` });
      this.current = this.pending;
      this.pending = null;
      this.awaiting = new Set();
      this.useSendKey(this.current);
    }
    const roster = this.roster();
    const shown = JSON.stringify(roster);
    if (shown !== this.shownRoster) {
      this.shownRoster = shown;
      this.ui({ roster });
    }
    const members = [{ identity: this.identity.publicKey, generation: (this.pending || this.current).generation }];
    for (const state of this.peers.values()) if (state.member) members.push({ identity: state.identity, generation: state.generation });
    const covered = JSON.stringify(members.map(({ identity, generation }) => [Array.from(identity), generation]).sort());
    if (this.code === null || this.code.covered !== covered) {
      const code = await groupSecurityCode(members);
      const changed = this.code === null || this.code.value !== code;
      this.code = { covered, value: code };
      if (changed) this.ui({ code, members: members.length });
    }
  }

  roster() {
    return [...this.peers]
      .filter(([, state]) => state.member)
      .map(([peerId, { protection }]) => ({ peerId, name: protection.peerName, fingerprint: protection.fingerprint, status: protection.pin }))
      .sort((a, b) => (a.name === b.name ? (a.peerId < b.peerId ? -1 : 1) : a.name < b.name ? -1 : 1));
  }

  // -- the media: one connection to the hub, which offers

  mediaOffer(sdp) {
    return this.steps.run(async () => {
      if (this.pc !== null) return this.ui({ log: "ignored a second media offer from the hub" });
      await this.workerReady;
      const pc = (this.pc = new RTCPeerConnection({ iceServers: [] }));
      pc.ontrack = ({ transceiver, track }) => this.ui({ slotTrack: { mid: transceiver.mid, kind: track.kind, track } });
      pc.onconnectionstatechange = () => {
        if (["failed", "closed"].includes(pc.connectionState)) this.steps.run(() => this.end({ error: { kind: "CallFailed", message: `the media connection to the hub is ${pc.connectionState}` } }));
      };
      await pc.setRemoteDescription({ type: "offer", sdp: mediaPolicy(sdp) });
      // Every transform now, before any await: Chromium short-circuits the encoded transform of
      // every sender and receiver still without one once the task that created it ends (W3C
      // Encoded Transform, stream creation), and a transform set later is attached to the worker
      // yet never given a frame, so ciphertext would reach the decoder and our camera would
      // leave unencrypted. Our tracks go on the first transceiver of each kind, where the hub
      // receives what we publish; every other one is a slot that only receives.
      const sending = new Map();
      for (const transceiver of pc.getTransceivers()) {
        const kind = transceiver.receiver.track.kind;
        if (sending.has(kind)) {
          transceiver.receiver.transform = new RTCRtpScriptTransform(this.worker, { side: "receive", kind, mid: transceiver.mid });
          transceiver.direction = "recvonly";
        } else {
          // Fail closed before any media can flow: no frame leaves without our sender key.
          transceiver.sender.transform = new RTCRtpScriptTransform(this.worker, { side: "send", kind });
          sending.set(kind, transceiver);
        }
        const { codecs } = RTCRtpReceiver.getCapabilities(kind);
        // Opus, and VP8 without RTX (see call.js preferCodecs).
        transceiver.setCodecPreferences(codecs.filter((codec) => codec.mimeType === (kind === "audio" ? "audio/opus" : "video/VP8")));
      }
      const tracks = new Map(this.localStream.getTracks().map((track) => [track.kind, track]));
      for (const [kind, transceiver] of sending) {
        const track = tracks.get(kind);
        if (track) {
          await transceiver.sender.replaceTrack(track);
          transceiver.direction = "sendonly";
        } else transceiver.direction = "inactive";
      }
      const answer = await pc.createAnswer();
      await pc.setLocalDescription({ type: "answer", sdp: mediaPolicy(answer.sdp) });
      // No trickle ICE: the candidates go in the answer.
      await new Promise((resolve) => {
        if (pc.iceGatheringState === "complete") return resolve();
        pc.addEventListener("icegatheringstatechange", () => pc.iceGatheringState === "complete" && resolve());
      });
      this.hub.sendMediaAnswer(pc.localDescription.sdp);
      this.ui({ log: "answered the hub's media offer" });
      this.audit = new MediaAudit({
        pc,
        worker: this.worker,
        audited: (audit) => this.ui({ audit }),
        bypassed: (message) => this.steps.run(() => this.end({ error: { kind: "CallFailed", message } })),
      });
      this.audit.start();
    });
  }

  mediaTracks(tracks) {
    const owners = Object.fromEntries(tracks.map(({ mid, peerId }) => [mid, peerId]));
    this.worker.postMessage({ type: "slots", owners });
    this.ui({ slots: owners });
  }

  // -- the end

  end(outcome) {
    if (this.ended) return;
    this.ended = true;
    this.steps.stop();
    for (const { call } of this.peers.values()) call.close();
    this.peers.clear();
    if (this.audit) this.audit.stop();
    if (this.pc) this.pc.close();
    this.worker.terminate();
    this.ui(outcome);
  }
}
