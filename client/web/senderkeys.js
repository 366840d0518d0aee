// Sender keys for group calls (RFC 9605 section 5.1), as crypto/sender_keys.py: each member's
// own SFrame key at (generation, ratchet step), KID = generation << 8 | step % 256; the
// receiver of one remote sender, which follows its ratchet, holds frames whose key has not
// arrived and drops frames from before we joined; and the group security code.
// docs/reference/sframe.md (Sender keys) is the specification; tests/test_web_vectors.py runs
// tests/vectors/group/ through this module in Chromium.

import { ReceiveContext, SUITES as SFRAME_SUITES, parseHeader, ratchetBaseKey } from "./sframe.js";
import { concat, sha256, toBigInt, uint, utf8 } from "./protocol.js";

export const RATCHET_BITS = 8;
const STEPS = 1 << RATCHET_BITS;
const HALF_STEPS = STEPS >> 1;
export const MAX_GENERATION = 2 ** 31;
export const MAX_STEP = 2 ** 31;
// The bounds of crypto/sender_keys.py, for the same reasons (see there).
export const MAX_RATCHET_STEPS = 16;
export const MAX_OLD_STEPS = 4;
export const MAX_HELD_FRAMES = 64;

const mod = (value, modulus) => ((value % modulus) + modulus) % modulus;

// The KID of (generation, step), a Number: below 2^40, exact in a double.
export function senderKeyKid(generation, step) {
  return generation * STEPS + (step % STEPS);
}

const generationOf = (kid) => Number(BigInt(kid) >> BigInt(RATCHET_BITS));
const stepBitsOf = (kid) => Number(BigInt(kid) & BigInt(STEPS - 1));

// One sender's key: {suite, generation, step, kid, baseKey}. The page holds its own and hands
// each member's to the worker; only sealed messages carry them between members.
export class SenderKey {
  constructor(suite, generation, step, baseKey) {
    const nh = SFRAME_SUITES[suite] && SFRAME_SUITES[suite].nh;
    if (!nh) throw new TypeError("unknown SFrame cipher suite");
    if (!Number.isInteger(generation) || generation < 0 || generation > MAX_GENERATION) throw new TypeError(`a key generation is an integer from 0 to ${MAX_GENERATION}`);
    if (!Number.isInteger(step) || step < 0 || step > MAX_STEP) throw new TypeError(`a ratchet step is an integer from 0 to ${MAX_STEP}`);
    if (baseKey.length !== nh) throw new TypeError(`a suite ${suite} sender key is ${nh} bytes`);
    Object.assign(this, { suite, generation, step, baseKey: Uint8Array.from(baseKey), kid: senderKeyKid(generation, step) });
    Object.freeze(this);
  }

  static fresh(suite, generation, random) {
    return new SenderKey(suite, generation, 0, random(SFRAME_SUITES[suite].nh));
  }

  // The next step: the previous base key cannot be computed from it.
  async ratcheted() {
    if (this.step === MAX_STEP) throw new TypeError("no ratchet steps left in this generation");
    return new SenderKey(this.suite, this.generation, this.step + 1, await ratchetBaseKey(this.suite, this.baseKey));
  }
}

// -- the group security code (crypto/sender_keys.py group_security_code) ---------------------

const GROUP_CODE_LABEL = utf8("blindhub-v2 group security code");
const GROUP_CODE_DIGITS = 30n;
const GROUP_CODE_ITERATIONS = 5200;
const GROUP_CODE_NO_KEY = 2n ** 64n - 1n;

function compareBytes(a, b) {
  for (let i = 0; i < Math.min(a.length, b.length); i++) if (a[i] !== b[i]) return a[i] - b[i];
  return a.length - b.length;
}

// `members`: [{identity: 32 raw bytes, generation: a Number, or null for a member whose key
// has not reached us}], ours included. The same set gives the same code on every screen.
export async function groupSecurityCode(members) {
  const entries = members.map(({ identity, generation }) => ({ identity, generation: generation === null ? GROUP_CODE_NO_KEY : BigInt(generation) }));
  entries.sort((a, b) => compareBytes(a.identity, b.identity));
  for (let i = 1; i < entries.length; i++) {
    if (compareBytes(entries[i - 1].identity, entries[i].identity) === 0) throw new TypeError("each member of a group security code is listed once");
  }
  const transcript = concat(GROUP_CODE_LABEL, uint(entries.length, 4), ...entries.flatMap(({ identity, generation }) => [identity, uint(generation, 8)]));
  const first = await sha256(transcript);
  let digest = first;
  for (let i = 0; i < GROUP_CODE_ITERATIONS; i++) digest = await sha256(concat(digest, first));
  const digits = String(toBigInt(digest) % 10n ** GROUP_CODE_DIGITS).padStart(Number(GROUP_CODE_DIGITS), "0");
  return digits.match(/.{5}/g).join(" ");
}

// -- receiving: one remote sender -------------------------------------------------------------

class SenderKeyRejected extends Error {
  constructor(message) {
    super(message);
    this.kind = "SenderKeyRejected";
  }
}

const unknownKey = (kid) => Object.assign(new Error(`no key for KID ${kid}`), { kind: "UnknownKeyError" });

function newCounters() {
  return { decrypted: 0, failed: 0, reasons: {}, held: 0, released: 0, expired: 0, overflowed: 0, beforeJoin: 0, generations: new Set() };
}

// The frames of one remote sender, both kinds, under its sender keys: the same rules as
// crypto/sender_keys.py's SenderKeyReceiver (see there). Every operation runs alone, in call
// order (each awaits WebCrypto): `unprotect(kind, frame, tag)` gives the plaintext, or null for
// a frame held, dropped as sent before we joined, or failed (counted by reason); `addKey(key)`
// gives the held frames that now decrypt, [{kind, plaintext, tag}] in arrival order.
export class SenderKeyReceiver {
  constructor(suite) {
    this.suite = suite;
    this.kinds = new Map();
    this.chains = new Map(); // generation -> {step, baseKey, ahead, oldKids}
    this.keys = new Map(); // KID (BigInt) -> base key
    this.join = null; // [generation, step] of the first key
    this.newestGeneration = -1;
    this.retiredBelow = 0;
    this.arrivals = 0;
    this.lock = Promise.resolve();
  }

  serialized(operation) {
    const run = this.lock.then(operation);
    this.lock = run.catch(() => {});
    return run;
  }

  counters() {
    const out = {};
    for (const [kind, state] of this.kinds) out[kind] = { ...state.counters, reasons: { ...state.counters.reasons }, generations: [...state.counters.generations].sort((a, b) => a - b) };
    return out;
  }

  addKey(key) {
    return this.serialized(async () => {
      const { generation, step } = key;
      if (key.suite !== this.suite) throw new SenderKeyRejected(`a suite ${key.suite} key for a suite ${this.suite} receiver`);
      const chain = this.chains.get(generation);
      if (chain) {
        if (chain.step === step && chain.baseKey.every((byte, i) => byte === key.baseKey[i])) return [];
        throw new SenderKeyRejected(`a second key for generation ${generation}`);
      }
      if (generation < this.retiredBelow || generation <= this.newestGeneration) throw new SenderKeyRejected(`generation ${generation} is older than the newest held`);
      const baseKey = Uint8Array.from(key.baseKey);
      this.chains.set(generation, { step, baseKey, ahead: [], oldKids: [] });
      await this.install(BigInt(key.kid), baseKey);
      this.newestGeneration = generation;
      if (this.join === null) this.join = [generation, step];
      return this.release();
    });
  }

  retireGenerationsBelow(below) {
    return this.serialized(() => {
      for (const [generation, chain] of [...this.chains]) {
        if (generation >= below) continue;
        this.chains.delete(generation);
        for (const kid of [...chain.oldKids, BigInt(senderKeyKid(generation, chain.step))]) this.uninstall(kid);
      }
      this.retiredBelow = Math.max(this.retiredBelow, below);
    });
  }

  // The hold window of `kind` is over: drop what still waits; returns how many.
  expireHeld(kind) {
    return this.serialized(() => {
      const state = this.kinds.get(kind);
      if (!state) return 0;
      const count = state.held.length;
      state.held = [];
      state.counters.expired += count;
      return count;
    });
  }

  async kindState(kind) {
    let state = this.kinds.get(kind);
    if (!state) {
      state = { context: new ReceiveContext(this.suite), counters: newCounters(), metadata: utf8(kind), held: [] };
      this.kinds.set(kind, state);
      for (const [kid, baseKey] of this.keys) await state.context.addKey(kid, baseKey, this.firstUse(state));
    }
    return state;
  }

  firstUse(state) {
    return (kid) => state.counters.generations.add(generationOf(kid));
  }

  async install(kid, baseKey, present = null) {
    this.keys.set(kid, baseKey);
    for (const state of this.kinds.values()) if (state !== present) await state.context.addKey(kid, baseKey, this.firstUse(state));
  }

  uninstall(kid) {
    this.keys.delete(kid);
    for (const state of this.kinds.values()) state.context.removeKey(kid);
  }

  unprotect(kind, frame, tag = null) {
    return this.serialized(async () => this.tryFrame(await this.kindState(kind), frame, null, tag));
  }

  async tryFrame(state, frame, arrival, tag) {
    try {
      const plaintext = await state.context.unprotect(frame, state.metadata);
      state.counters.decrypted++;
      return plaintext;
    } catch (error) {
      if (error.kind !== "UnknownKeyError") return this.failed(state, error);
    }
    return this.withoutKey(state, frame, arrival, tag);
  }

  // A frame whose KID has no key installed: follow the ratchet, hold it, or drop it as sent
  // before we joined, or as failed.
  async withoutKey(state, frame, arrival, tag) {
    try {
      const { kid } = parseHeader(frame);
      if (this.join === null || generationOf(kid) > this.newestGeneration) {
        this.hold(state, frame, arrival, tag);
        return null;
      }
      if (this.beforeJoin(kid)) {
        state.counters.beforeJoin++;
        return null;
      }
      const plaintext = await this.ratchet(state, kid, frame);
      state.counters.decrypted++;
      return plaintext;
    } catch (error) {
      return this.failed(state, error);
    }
  }

  failed(state, error) {
    const reason = error.kind || "MalformedHeaderError";
    state.counters.failed++;
    state.counters.reasons[reason] = (state.counters.reasons[reason] || 0) + 1;
    return null;
  }

  hold(state, frame, arrival, tag) {
    if (arrival === null) {
      arrival = this.arrivals++;
      state.counters.held++;
    }
    state.held.push({ arrival, frame, tag });
    if (state.held.length > MAX_HELD_FRAMES) {
      state.held.shift();
      state.counters.overflowed++;
    }
  }

  beforeJoin(kid) {
    const [joinGeneration, joinStep] = this.join;
    const generation = generationOf(kid);
    if (generation !== joinGeneration) return generation < joinGeneration;
    const chain = this.chains.get(generation);
    if (!chain) return false; // retired: a late frame
    const behind = mod(chain.step - stepBitsOf(kid), STEPS);
    return behind < HALF_STEPS && chain.step - behind < joinStep;
  }

  // Decrypt under a later step of the frame's generation; adopt that step only if the frame
  // authenticates (RFC 9605 section 5.1: the receiver ratchets as the KID shows).
  async ratchet(state, kid, frame) {
    const generation = generationOf(kid);
    const chain = this.chains.get(generation);
    if (!chain) throw unknownKey(kid);
    const ahead = mod(stepBitsOf(kid) - chain.step, STEPS);
    if (!(ahead > 0 && ahead <= MAX_RATCHET_STEPS)) throw unknownKey(kid);
    while (chain.ahead.length < ahead) chain.ahead.push(await ratchetBaseKey(this.suite, chain.ahead.length ? chain.ahead[chain.ahead.length - 1] : chain.baseKey));
    const baseKey = chain.ahead[ahead - 1];
    await state.context.addKey(kid, baseKey);
    let plaintext;
    try {
      plaintext = await state.context.unprotect(frame, state.metadata);
    } catch (error) {
      state.context.removeKey(kid);
      throw error;
    }
    // Adopted: this kind's context keeps the key (and its replay window); the other kinds get
    // it now, and the skipped steps stay as old steps (their frames may still be on the way).
    state.counters.generations.add(generation);
    chain.oldKids.push(BigInt(senderKeyKid(generation, chain.step)));
    for (let skipped = 1; skipped < ahead; skipped++) {
      const skippedKid = BigInt(senderKeyKid(generation, chain.step + skipped));
      await this.install(skippedKid, chain.ahead[skipped - 1]);
      chain.oldKids.push(skippedKid);
    }
    chain.step += ahead;
    chain.baseKey = baseKey;
    chain.ahead.splice(0, ahead);
    await this.install(kid, baseKey, state);
    while (chain.oldKids.length > MAX_OLD_STEPS) this.uninstall(chain.oldKids.shift());
    return plaintext;
  }

  async release() {
    const released = [];
    for (const [kind, state] of this.kinds) {
      const waiting = state.held;
      state.held = [];
      for (const { arrival, frame, tag } of waiting) {
        const plaintext = await this.tryFrame(state, frame, arrival, tag);
        if (plaintext !== null) {
          state.counters.released++;
          released.push({ arrival, kind, plaintext, tag });
        }
      }
    }
    released.sort((a, b) => a.arrival - b.arrival);
    return released.map(({ kind, plaintext, tag }) => ({ kind, plaintext, tag }));
  }
}
