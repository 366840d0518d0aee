// The hub connection: join a room, relay payloads, hear who joins and leaves
// (docs/reference/hub-protocol.md). The hub is the adversary, so every frame is read with the
// strict JSON parser and checked against this connection's state, as
// client/hub_connection.py does; who really sent a payload is the key agreement's job.

import { strictParse } from "./protocol.js";

const NAME = /^[A-Za-z0-9_-]{1,64}$/;

export class HubConnection {
  // `onEvent({type: "peer-joined" | "peer-left", peerId} | {type: "relay", from, payload}
  // | {type: "media-offer", sdp} | {type: "media-tracks", tracks: [{mid, kind, peerId}]}
  // | {type: "error", message} | {type: "closed", code, reason})`. The media messages come
  // only in a room whose welcome said "routed" (the hub routes the media of a group call).
  constructor(url, onEvent) {
    this.url = url;
    this.onEvent = onEvent;
    this.peers = new Set();
    this.peerId = null;
    this.room = null;
  }

  async join(room) {
    if (!NAME.test(room)) throw new Error("a room is 1 to 64 of A-Z a-z 0-9 - _");
    this.socket = new WebSocket(this.url);
    await new Promise((resolve, reject) => {
      this.socket.onopen = resolve;
      this.socket.onerror = () => reject(new Error(`cannot reach the hub at ${this.url}`));
    });
    const welcome = new Promise((resolve, reject) => {
      this.pendingJoin = { room, resolve, reject };
    });
    this.socket.onmessage = (event) => this.receive(event.data);
    this.socket.onclose = (event) => {
      if (this.pendingJoin) this.pendingJoin.reject(new Error(`the hub closed the connection (${event.code})`));
      this.onEvent({ type: "closed", code: event.code, reason: event.reason });
    };
    this.socket.send(JSON.stringify({ type: "join", room }));
    return welcome;
  }

  receive(text) {
    let message;
    try {
      // One level deeper than a payload's own limit: the relay frame around it.
      message = strictParse(String(text), 33);
      this.dispatch(message);
    } catch (error) {
      this.onEvent({ type: "error", message: `refused a message from the hub: ${error.message}` });
    }
  }

  dispatch(message) {
    const pending = this.pendingJoin;
    if (pending) {
      this.pendingJoin = null;
      if (message.type === "error") return pending.reject(new Error(`the hub refused to join: ${message.code}`));
      if (message.type !== "welcome" || message.room !== pending.room || !NAME.test(message.peer_id)) {
        return pending.reject(new Error("the hub did not answer the join with its welcome"));
      }
      const peers = message.peers;
      if (!Array.isArray(peers) || !peers.every((id) => NAME.test(id)) || new Set(peers).size !== peers.length || peers.includes(message.peer_id)) {
        return pending.reject(new Error("the welcome lists this peer or one peer twice"));
      }
      if (message.media !== "peer-to-peer" && message.media !== "routed") return pending.reject(new Error("the welcome does not say how media flows"));
      this.peerId = message.peer_id;
      this.room = pending.room;
      this.peers = new Set(peers);
      this.routed = message.media === "routed";
      return pending.resolve({ peerId: message.peer_id, peers, media: message.media });
    }
    switch (message.type) {
      case "peer-joined":
        if (!NAME.test(message.peer_id) || this.peers.has(message.peer_id) || message.peer_id === this.peerId) throw new Error("a peer joined twice");
        this.peers.add(message.peer_id);
        return this.onEvent({ type: "peer-joined", peerId: message.peer_id });
      case "peer-left":
        if (!this.peers.delete(message.peer_id)) throw new Error("a peer that is not here left");
        return this.onEvent({ type: "peer-left", peerId: message.peer_id });
      case "relay":
        if (!this.peers.has(message.from)) throw new Error("a relay from a peer that is not here");
        return this.onEvent({ type: "relay", from: message.from, payload: message.payload });
      case "media-offer":
        if (!this.routed || typeof message.sdp !== "string" || Object.keys(message).length !== 2) throw new Error("an unexpected media offer");
        return this.onEvent({ type: "media-offer", sdp: message.sdp });
      case "media-tracks":
        if (!this.routed) throw new Error("media tracks in a room whose media is not routed");
        return this.onEvent({ type: "media-tracks", tracks: parseTracks(message.tracks) });
      case "error":
        return this.onEvent({ type: "error", message: `the hub answered: ${message.code}: ${message.message}` });
      default:
        throw new Error(`unexpected '${message.type}'`);
    }
  }

  sendMediaAnswer(sdp) {
    if (!this.socket || this.socket.readyState !== WebSocket.OPEN) throw new Error("the hub connection is closed");
    this.socket.send(JSON.stringify({ type: "media-answer", sdp }));
  }

  relay(to, payload) {
    if (!this.socket || this.socket.readyState !== WebSocket.OPEN) throw new Error("the hub connection is closed");
    this.socket.send(JSON.stringify({ type: "relay", to, payload }));
  }

  close() {
    if (this.socket && this.socket.readyState <= WebSocket.OPEN) {
      try {
        this.socket.send(JSON.stringify({ type: "leave" }));
      } catch {
        // already closing
      }
      this.socket.close(1000);
    }
  }
}

// The hub's slot map, as signaling/protocol.py reads it: a hint (whose key decrypts a frame
// decides whose it is), but well formed.
const MID = /^[A-Za-z0-9]{1,16}$/;

function parseTracks(tracks) {
  if (!Array.isArray(tracks)) throw new Error("media tracks are a list");
  const parsed = tracks.map((track) => {
    if (track === null || typeof track !== "object" || Object.keys(track).sort().join() !== "kind,mid,peer_id") throw new Error("a track has exactly mid, kind and peer_id");
    if (typeof track.mid !== "string" || !MID.test(track.mid) || !["audio", "video"].includes(track.kind) || !NAME.test(track.peer_id)) throw new Error("a malformed track");
    return { mid: track.mid, kind: track.kind, peerId: track.peer_id };
  });
  if (new Set(parsed.map((track) => track.mid)).size !== parsed.length) throw new Error("a mid appears twice in tracks");
  return parsed;
}
