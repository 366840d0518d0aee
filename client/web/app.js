// The page: room and name, join and leave, the roster with each peer's status, fingerprint,
// SAS and frame counters, and one state line that says whether the call is end-to-end
// encrypted and with whom, or why not. ?room=R&name=N&autojoin=1 joins without a click.
// A hub that routes media (its welcome says "routed") makes the room a group call (group.js):
// the roster of the members we share keys with, one SAS question per new member, the group
// security code, and each member's counters and received tone on its row.

import { Call } from "./call.js";
import { GroupCall } from "./group.js";
import { HubConnection } from "./hub.js";
import { b64decode, fingerprint, normalizeName } from "./protocol.js";
import { loadIdentity, pins } from "./store.js";

const $ = (id) => document.getElementById(id);
const hubUrl = document.querySelector('meta[name="blindhub-hub"]').content;
let identity = null;
let hub = null;
let call = null;
let group = null;
let localStream = null;
let roster = [];
let groupCode = null;
const sasQueue = []; // {peerId, name, sas, pin}: the group's SAS questions, one at a time
const slotOwners = new Map(); // mid -> peer id, as the hub says
const rows = new Map();
const analysers = new Map();
let audioContext = null;

function setState(kind, text) {
  const line = $("state");
  line.className = `state state-${kind}`;
  line.textContent = text;
}

function log(text) {
  const item = document.createElement("li");
  item.textContent = `${new Date().toLocaleTimeString()} ${text}`;
  $("log").append(item);
  $("log").scrollTop = $("log").scrollHeight;
}

function row(peerId) {
  let entry = rows.get(peerId);
  if (!entry) {
    const tr = document.createElement("tr");
    tr.dataset.peer = peerId;
    const cells = {};
    for (const name of ["peer", "status", "fingerprint", "sas", "sent", "decrypted", "failed"]) {
      cells[name] = document.createElement("td");
      cells[name].className = name;
      tr.append(cells[name]);
    }
    cells.peer.textContent = `(unauthenticated ${peerId})`;
    cells.status.textContent = "…";
    $("roster").tBodies[0].append(tr);
    entry = { tr, cells };
    rows.set(peerId, entry);
  }
  return entry;
}

function removeRow(peerId) {
  const entry = rows.get(peerId);
  if (entry) entry.tr.remove();
  rows.delete(peerId);
  const analyser = analysers.get(peerId);
  if (analyser) clearInterval(analyser.timer);
  analysers.delete(peerId);
}

// The received audio's strongest frequency, shown next to the counters: a listener's check
// that sound arrives, and what the tests read.
function listen(peerId, stream) {
  if (stream.getVideoTracks().length > 0) {
    $("remote-video").srcObject = stream;
    $("remote-video").hidden = false;
  }
  analyse(peerId, stream, () => row(peerId).cells.decrypted);
}

// `key`'s analyser writes what it hears on the cell `cellOf()` names (none: nobody's).
function analyse(key, stream, cellOf) {
  if (analysers.has(key) || stream.getAudioTracks().length === 0) return;
  const element = new Audio();
  element.srcObject = stream;
  element.play().catch(() => log("the browser did not let the audio play: click the page"));
  audioContext = audioContext || new AudioContext({ sampleRate: 48000 });
  const analyser = audioContext.createAnalyser();
  analyser.fftSize = 16384;
  analyser.smoothingTimeConstant = 0;
  audioContext.createMediaStreamSource(stream).connect(analyser);
  const bins = new Float32Array(analyser.frequencyBinCount);
  const timer = setInterval(() => {
    analyser.getFloatFrequencyData(bins);
    let peak = 1;
    for (let i = 2; i < bins.length - 1; i++) if (bins[i] > bins[peak]) peak = i;
    const [left, centre, right] = [bins[peak - 1], bins[peak], bins[peak + 1]];
    const denominator = left - 2 * centre + right;
    const offset = denominator === 0 ? 0 : (0.5 * (left - right)) / denominator;
    const hertz = ((peak + offset) * audioContext.sampleRate) / analyser.fftSize;
    const cell = cellOf();
    if (!cell) return;
    cell.dataset.hearing = centre > -90 ? hertz.toFixed(1) : "";
    cell.title = centre > -90 ? `hearing about ${hertz.toFixed(0)} Hz` : "silence";
  }, 250);
  analysers.set(key, { analyser, timer, element });
}

function onCallUpdate(update) {
  const { peerId, state } = update;
  const { cells } = row(peerId);
  const name = update.peerName;
  if (name) {
    cells.peer.textContent = name;
    const code = document.createElement("code");
    code.textContent = update.fingerprint;
    cells.fingerprint.replaceChildren(code);
    cells.sas.textContent = update.sas || "";
  }
  if (update.pin) {
    cells.status.textContent = update.pin;
    cells.status.className = `status pin-${update.pin}`;
  }
  if (update.counters) {
    for (const counter of ["sent", "decrypted", "failed"]) {
      const { audio, video } = update.counters;
      cells[counter].textContent = update.counters[counter];
      Object.assign(cells[counter].dataset, { audio: audio[counter], video: video[counter] });
      cells[counter].title = `audio ${audio[counter]}, video ${video[counter]}`;
    }
    const reasons = Object.entries(update.counters.reasons).map(([reason, times]) => `${reason} ${times}`);
    if (reasons.length > 0) cells.failed.title += `: ${reasons.join(", ")}`;
    if (update.setupMs !== null && !cells.decrypted.dataset.setupMs) {
      cells.decrypted.dataset.setupMs = update.setupMs.toFixed(0);
      log(`first decrypted audio ${(update.setupMs / 1000).toFixed(2)} s after joining`);
    }
  }
  if (update.audit) $("roster").dataset.audit = JSON.stringify(update.audit);
  if (update.remoteStream) listen(peerId, update.remoteStream);
  if (update.log) log(update.log);
  $("sas-box").hidden = !(state === "await-sas");
  if (update.askSas) {
    $("sas-peer").textContent = name;
    $("sas").textContent = update.sas;
    $("sas-yes").focus();
  }
  if (update.error) {
    setState("failed", `NOT end-to-end encrypted: the call failed (${update.error.kind}): ${update.error.message}. No media is sent.`);
    log(`call failed: ${update.error.kind}: ${update.error.message}`);
    return finishCall();
  }
  if (update.ended) {
    setState("idle", `Call with ${call && call.result ? call.result.peerName : "the peer"} ended (${update.ended}). No media is sent.`);
    log(`call ended: ${update.ended}`);
    return finishCall();
  }
  const who = call && call.result ? call.result.peerName : null;
  switch (state) {
    case "key-agreement":
      return setState("progress", "Agreeing keys with the peer… no media is sent yet.");
    case "await-sas":
      return setState("progress", `Compare the SAS with ${who} (${update.pin}): ${update.sas}. No media until you both confirm.`);
    case "await-peer":
      return setState("progress", `Waiting for ${who} to confirm the SAS… no media is sent yet.`);
    case "negotiating":
      return setState("progress", `Setting up encrypted media with ${who}…`);
    case "in-call":
      return setState("secure", `End-to-end encrypted (${call.protection.suite}) with ${who}, ${call.pin} ${call.fingerprint}. SAS ${call.protection.sas}.`);
  }
}

function finishCall() {
  $("sas-box").hidden = true;
  sasQueue.length = 0;
  slotOwners.clear();
  $("group-videos").replaceChildren();
  group = null;
  for (const peerId of [...analysers.keys()]) {
    clearInterval(analysers.get(peerId).timer);
    analysers.delete(peerId);
  }
  $("remote-video").srcObject = null;
  $("remote-video").hidden = true;
  if (hub) hub.close();
  hub = null;
  if (localStream) for (const track of localStream.getTracks()) track.stop();
  localStream = null;
  $("join").disabled = false;
  $("leave").disabled = true;
  showContacts();
}

// The pinned contacts, each with a button that forgets it (as `blindhub contacts forget`):
// shown at start and after every call, which may have pinned or verified one.
let contactsShown = 0; // the latest showContacts: an earlier one that ends later shows nothing

async function showContacts() {
  const body = $("contacts").tBodies[0];
  const run = ++contactsShown;
  const shown = [];
  for (const pin of await pins.all()) {
    const tr = document.createElement("tr");
    tr.dataset.name = pin.name;
    const forget = document.createElement("button");
    forget.type = "button";
    forget.textContent = "Forget";
    forget.className = "forget";
    forget.addEventListener("click", () => forgetContact(pin.name, forget));
    const [name, key, status] = ["td", "td", "td"].map((tag) => document.createElement(tag));
    const code = document.createElement("code");
    code.textContent = await fingerprint(b64decode(pin.publicKey));
    key.append(code);
    name.textContent = pin.name;
    status.textContent = pin.verified ? "VERIFIED" : "PINNED";
    status.className = `pin-${status.textContent}`;
    tr.append(name, key, status);
    const action = document.createElement("td");
    action.append(forget);
    tr.append(action);
    shown.push(tr);
  }
  if (run === contactsShown) body.replaceChildren(...shown);
}

async function forgetContact(name, button) {
  // Never in a call: the pin is what the call in progress was checked against.
  if ((call && call.state !== "ended") || group) return log(`${name}: not forgotten during a call`);
  button.disabled = true;
  try {
    await pins.remove(name);
  } catch (error) {
    button.disabled = false;
    return log(`${name}: not forgotten: ${error.message}`);
  }
  log(`forgot ${name}: the next key it presents is pinned anew`);
  await showContacts();
}

function startCall(peerId, initiator, joinTime) {
  call = new Call({ hub, peerId, initiator, identity, name: $("name").value, localStream, ui: onCallUpdate, joinTime });
  row(peerId);
  call.start();
}

// The microphone and the camera, or the microphone alone where there is no camera.
async function camera() {
  try {
    return await navigator.mediaDevices.getUserMedia({ audio: true, video: true });
  } catch (error) {
    if (error.name !== "NotFoundError" && error.name !== "NotReadableError") throw error;
    log(`no camera (${error.name}): audio only`);
    return navigator.mediaDevices.getUserMedia({ audio: true, video: false });
  }
}

async function join() {
  const joinTime = performance.timeOrigin + performance.now();
  const room = $("room").value;
  let name;
  try {
    name = normalizeName($("name").value);
  } catch (error) {
    setState("failed", `Not joined: ${error.message}.`);
    return;
  }
  $("name").value = name;
  $("join").disabled = true;
  $("leave").disabled = false;
  for (const peerId of [...rows.keys()]) removeRow(peerId);
  call = null;
  $("group-code-box").hidden = true;
  setState("progress", `Connecting to the hub ${hubUrl}…`);
  try {
    localStream = await camera();
    hub = new HubConnection(hubUrl, onHubEvent);
    const welcome = await hub.join(room);
    log(`joined room ${room} as ${welcome.peerId} (media ${welcome.media})`);
    hub.joinTime = joinTime;
    if (welcome.media === "routed") return startGroup(room, welcome.peers, joinTime);
    if (welcome.peers.length > 1) throw new Error(`room '${room}' already has a call`);
    // The peer that was in the room first initiates; both sides see the same order.
    if (welcome.peers.length === 1) startCall(welcome.peers[0], false, joinTime);
    else setState("progress", `Waiting for a peer in room ${room}… no media is sent.`);
  } catch (error) {
    setState("failed", `NOT in a call: ${error.message}. No media is sent.`);
    finishCall();
  }
}

function onHubEvent(event) {
  if (group) return onGroupHubEvent(event);
  switch (event.type) {
    case "peer-joined":
      if (call === null) return startCall(event.peerId, true, hub.joinTime);
      return log(`${event.peerId} joined, but this call already has a peer`);
    case "peer-left":
      if (call && call.peerId === event.peerId) call.peerLeft();
      return;
    case "relay":
      if (call && call.peerId === event.from) call.receive(event.payload);
      return;
    case "error":
      return log(event.message);
    case "closed":
      if (call && call.state !== "in-call") call.peerLeft();
      return log(`the hub connection closed (${event.code})`);
  }
}

function leave() {
  if (group) group.hangup("hangup");
  else if (call) call.hangup("hangup");
  else {
    finishCall();
    setState("idle", "Not in a call: no media is sent.");
  }
}

function sasAnswer(accepted) {
  if (!group) return call && call.sasAnswer(accepted);
  const asked = sasQueue.shift();
  if (asked) group.sasAnswer(asked.peerId, accepted);
  showNextSas();
}

// -- a group call (the hub routes the media)

function startGroup(room, peers, joinTime) {
  roster = [];
  groupCode = null;
  $("group-code").textContent = "…";
  $("group-code-box").hidden = false;
  group = new GroupCall({ hub, identity, name: $("name").value, localStream, ui: onGroupUpdate, joinTime });
  group.start(peers);
  groupState(room);
}

function onGroupHubEvent(event) {
  switch (event.type) {
    case "peer-joined":
      row(event.peerId);
      return group.peerJoined(event.peerId);
    case "peer-left":
      return group.peerLeft(event.peerId);
    case "relay":
      return group.relay(event.from, event.payload);
    case "media-offer":
      return group.mediaOffer(event.sdp);
    case "media-tracks":
      return group.mediaTracks(event.tracks);
    case "error":
      return log(event.message);
    case "closed":
      log(`the hub connection closed (${event.code})`);
      return group.hubClosed();
  }
}

function showNextSas() {
  const next = sasQueue[0];
  $("sas-box").hidden = !next;
  if (!next) return;
  $("sas-peer").textContent = `${next.name} (${next.pin})`;
  $("sas").textContent = next.sas;
  $("sas-yes").focus();
}

function onGroupUpdate(update) {
  if (!group && !update.ended && !update.error) return;
  if (update.log) log(update.log);
  if (update.peerId !== undefined) return onPairUpdate(update);
  if (update.roster) {
    roster = update.roster;
    for (const member of roster) {
      const { cells } = row(member.peerId);
      cells.peer.textContent = member.name;
      cells.status.textContent = member.status;
      cells.status.className = `status pin-${member.status}`;
    }
    log(`members: ${roster.map((member) => `${member.name} (${member.status})`).join(", ") || "none"}`);
  }
  if (update.code) {
    groupCode = update.code;
    $("group-code").textContent = update.code;
    log(`group security code of ${update.members}: ${update.code}`);
  }
  if (update.counters) showGroupCounters(update.counters);
  if (update.audit) $("roster").dataset.audit = JSON.stringify(update.audit);
  if (update.slots) {
    slotOwners.clear();
    for (const [mid, peerId] of Object.entries(update.slots)) slotOwners.set(mid, peerId);
    for (const video of $("group-videos").children) video.title = memberName(slotOwners.get(video.dataset.mid));
    log(`slots: ${Object.entries(update.slots).map(([mid, peerId]) => `${mid} ${memberName(peerId)}`).join(", ")}`);
  }
  if (update.slotTrack) showSlot(update.slotTrack);
  if (update.memberLeft) removeRow(update.memberLeft);
  if (update.error) {
    setState("failed", `NOT end-to-end encrypted: the group call failed (${update.error.kind}): ${update.error.message}. No media is sent.`);
    log(`group call failed: ${update.error.kind}: ${update.error.message}`);
    return finishCall();
  }
  if (update.ended) {
    setState("idle", `Group call ended (${update.ended}). No media is sent.`);
    log(`group call ended: ${update.ended}`);
    return finishCall();
  }
  groupState(hub && hub.room);
}

function memberName(peerId) {
  const member = roster.find((entry) => entry.peerId === peerId);
  return member ? member.name : peerId ? `(unauthenticated ${peerId})` : "nobody";
}

// One member's pair: its name, fingerprint, status and SAS on its row; the SAS question.
function onPairUpdate(update) {
  const { peerId } = update;
  if (!rows.has(peerId) && (update.error || update.ended)) return;
  const { cells } = row(peerId);
  if (update.peerName) {
    const code = document.createElement("code");
    code.textContent = update.fingerprint;
    cells.fingerprint.replaceChildren(code);
    cells.sas.textContent = update.sas || "";
  }
  if (update.pin && update.state !== "in-call") {
    cells.status.textContent = `${update.pin} (setting up)`;
    cells.status.className = `status pin-${update.pin}`;
  }
  if (update.askSas) {
    sasQueue.push({ peerId, name: update.peerName, sas: update.sas, pin: update.pin });
    if (sasQueue.length === 1) showNextSas();
  }
  if (update.error || update.ended) {
    const index = sasQueue.findIndex((asked) => asked.peerId === peerId);
    if (index >= 0) {
      sasQueue.splice(index, 1);
      if (index === 0) showNextSas();
    }
    if (update.error) log(`${update.peerName || cells.peer.textContent}: ${update.error.kind}: ${update.error.message}`);
  }
}

function showGroupCounters(counters) {
  $("roster").dataset.counters = JSON.stringify(counters);
  for (const [peerId, kinds] of Object.entries(counters.members)) {
    if (!rows.has(peerId)) continue;
    const { cells } = row(peerId);
    const audio = kinds.audio || {};
    const video = kinds.video || {};
    cells.sent.textContent = counters.sent.total;
    for (const counter of ["decrypted", "failed"]) {
      cells[counter].textContent = (audio[counter] || 0) + (video[counter] || 0);
      Object.assign(cells[counter].dataset, { audio: audio[counter] || 0, video: video[counter] || 0 });
    }
    const waits = (kind, counted) => `${kind}: held ${counted.held || 0}, released ${counted.released || 0}, expired ${counted.expired || 0}, before join ${counted.beforeJoin || 0}, generations ${(counted.generations || []).join(" ")}`;
    cells.decrypted.title = `${waits("audio", audio)}; ${waits("video", video)}`;
    const reasons = Object.entries({ ...audio.reasons, ...video.reasons }).map(([reason, times]) => `${reason} ${times}`);
    cells.failed.title = reasons.join(", ");
    if (kinds.firstAudio !== null && !cells.decrypted.dataset.setupMs) {
      cells.decrypted.dataset.setupMs = (kinds.firstAudio - hub.joinTime).toFixed(0);
      log(`first decrypted audio of ${memberName(peerId)} ${((kinds.firstAudio - hub.joinTime) / 1000).toFixed(2)} s after joining`);
    }
  }
}

// A slot's track: its audio analysed under the member the hub maps it to now, its video shown.
function showSlot({ mid, kind, track }) {
  const stream = new MediaStream([track]);
  if (kind === "audio") {
    analyse(`slot ${mid}`, stream, () => {
      const owner = slotOwners.get(mid);
      return owner && rows.has(owner) ? rows.get(owner).cells.decrypted : null;
    });
    return;
  }
  const video = document.createElement("video");
  Object.assign(video, { autoplay: true, playsInline: true, muted: true, srcObject: stream, title: memberName(slotOwners.get(mid)) });
  video.dataset.mid = mid;
  $("group-videos").append(video);
}

function groupState(room) {
  if (roster.length === 0) {
    return setState("progress", `Group call in room ${room}: no member authenticated yet, so nobody can read what this page sends.`);
  }
  const names = roster.map((member) => `${member.name} (${member.status})`).join(", ");
  setState("secure", `End-to-end encrypted (${group.suiteName}) with ${names}. Group security code ${groupCode || "…"}: the same on every screen, or someone else is in the call.`);
}

async function main() {
  $("hub").textContent = hubUrl;
  const params = new URLSearchParams(location.search);
  $("room").value = params.get("room") || "";
  $("name").value = params.get("name") || "";
  $("join-form").addEventListener("submit", (event) => {
    event.preventDefault();
    join();
  });
  $("leave").addEventListener("click", leave);
  $("sas-yes").addEventListener("click", () => sasAnswer(true));
  $("sas-no").addEventListener("click", () => sasAnswer(false));
  try {
    identity = await loadIdentity();
  } catch (error) {
    setState("failed", `No identity: ${error.message}. This browser cannot keep a non-extractable Ed25519 key.`);
    return;
  }
  $("fingerprint").textContent = await fingerprint(identity.publicKey);
  await showContacts();
  document.body.dataset.ready = "1";
  if (params.get("autojoin") === "1" && $("room").value && $("name").value) join();
}

main();
