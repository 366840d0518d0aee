// SFrame, RFC 9605, with WebCrypto only: the header, the key schedule, the five registered
// suites (AES-GCM, and AES-CTR with a truncated HMAC) and per-KID send and receive contexts
// with the receiver's replay window. The same rules as crypto/sframe.py, which
// docs/reference/sframe.md describes; tests/test_web_vectors.py checks this module against
// tests/vectors/sframe/test-vectors.json in Chromium. Used by the page's tests and by the
// encoded-transform worker (worker.js); KIDs and CTRs are BigInts (both run to 2^64 - 1).

const subtle = globalThis.crypto.subtle;
const encoder = new TextEncoder();

export const MAX_U64 = (1n << 64n) - 1n;
export const REPLAY_WINDOW = 128n;
const MIN_BASE_KEY_LENGTH = 16;

export const SUITES = {
  1: { nh: 32, nka: 16, nk: 48, nn: 12, nt: 10, hash: "SHA-256" },
  2: { nh: 32, nka: 16, nk: 48, nn: 12, nt: 8, hash: "SHA-256" },
  3: { nh: 32, nka: 16, nk: 48, nn: 12, nt: 4, hash: "SHA-256" },
  4: { nh: 32, nka: 16, nk: 16, nn: 12, nt: 16, hash: "SHA-256", gcm: true },
  5: { nh: 64, nka: 32, nk: 32, nn: 12, nt: 16, hash: "SHA-512", gcm: true },
};

// The failures, named as in crypto/sframe.py.
export class SFrameError extends Error {
  constructor(kind, message) {
    super(message);
    this.kind = kind;
  }
}
const fail = (kind, message) => {
  throw new SFrameError(kind, message);
};

function suiteOf(code) {
  const suite = SUITES[code];
  if (!suite) fail("SFrameUsageError", "unknown SFrame cipher suite");
  return suite;
}

function concat(...parts) {
  const out = new Uint8Array(parts.reduce((sum, part) => sum + part.length, 0));
  let offset = 0;
  for (const part of parts) {
    out.set(part, offset);
    offset += part.length;
  }
  return out;
}

function bigBytes(value, size) {
  const out = new Uint8Array(size);
  for (let i = size - 1; i >= 0; i--) {
    out[i] = Number(value & 0xffn);
    value >>= 8n;
  }
  return out;
}

const byteLength = (value) => {
  let length = 0;
  for (let rest = value; rest > 0n; rest >>= 8n) length++;
  return length;
};

function checkU64(name, value) {
  if (typeof value !== "bigint" || value < 0n || value > MAX_U64) fail("SFrameUsageError", `${name} must be in 0..2**64-1`);
}

// -- the header (section 4.3) ------------------------------------------------------------

export function encodeHeader(kid, ctr) {
  checkU64("kid", kid);
  checkU64("ctr", ctr);
  let config = 0;
  let kidBytes = new Uint8Array(0);
  let ctrBytes = new Uint8Array(0);
  if (kid < 8n) config |= Number(kid) << 4;
  else {
    const length = byteLength(kid);
    config |= (0x8 | (length - 1)) << 4;
    kidBytes = bigBytes(kid, length);
  }
  if (ctr < 8n) config |= Number(ctr);
  else {
    const length = byteLength(ctr);
    config |= 0x08 | (length - 1);
    ctrBytes = bigBytes(ctr, length);
  }
  return concat(Uint8Array.of(config), kidBytes, ctrBytes);
}

function readExtended(name, data, start, end) {
  if (data.length < end) fail("MalformedHeaderError", `truncated SFrame header: ${name} needs ${end - start} bytes`);
  let value = 0n;
  for (let i = start; i < end; i++) value = (value << 8n) | BigInt(data[i]);
  // Exactly one byte string encodes each header: 0-7 are inline, and no leading zero byte.
  const smallest = end - start === 1 ? 8n : 1n << (8n * BigInt(end - start - 1));
  if (value < smallest) fail("MalformedHeaderError", `SFrame header ${name} is not minimally encoded`);
  return value;
}

// {kid, ctr, length} of the header at the start of `data`.
export function parseHeader(data) {
  if (data.length === 0) fail("MalformedHeaderError", "empty input: no SFrame header");
  const config = data[0];
  let end = 1;
  let kid;
  let ctr;
  if (config & 0x80) {
    end = 2 + ((config >> 4) & 0x7);
    kid = readExtended("KID", data, 1, end);
  } else kid = BigInt((config >> 4) & 0x7);
  if (config & 0x08) {
    const start = end;
    end = start + 1 + (config & 0x7);
    ctr = readExtended("CTR", data, start, end);
  } else ctr = BigInt(config & 0x7);
  return { kid, ctr, length: end };
}

// -- the key schedule (section 4.4.2) --------------------------------------------------------

async function hmac(hash, key, data) {
  const imported = await subtle.importKey("raw", key, { name: "HMAC", hash }, false, ["sign"]);
  return new Uint8Array(await subtle.sign("HMAC", imported, data));
}

async function hkdfExpand(hash, prk, info, length) {
  let block = new Uint8Array(0);
  let out = new Uint8Array(0);
  for (let counter = 1; out.length < length; counter++) {
    block = await hmac(hash, prk, concat(block, info, Uint8Array.of(counter)));
    out = concat(out, block);
  }
  return out.slice(0, length);
}

// {key, salt} for `baseKey` under `kid`; HKDF-Extract with an empty salt is HMAC keyed with
// Nh zero bytes (RFC 5869 section 2.2), which WebCrypto accepts where it refuses an empty key.
export async function deriveKeySalt(code, kid, baseKey) {
  const suite = suiteOf(code);
  checkU64("kid", kid);
  const secret = await hmac(suite.hash, new Uint8Array(suite.nh), baseKey);
  const context = concat(bigBytes(kid, 8), bigBytes(BigInt(code), 2));
  const key = await hkdfExpand(suite.hash, secret, concat(encoder.encode("SFrame 1.0 Secret key "), context), suite.nk);
  const salt = await hkdfExpand(suite.hash, secret, concat(encoder.encode("SFrame 1.0 Secret salt "), context), suite.nn);
  return { key, salt };
}

// -- sender keys (section 5.1) ---------------------------------------------------------------

// The next base key of a sender's ratchet: HKDF-Expand(HKDF-Extract("", base_key),
// "SFrame 1.0 Ratchet", Nh), as crypto/sframe.py's ratchet_base_key.
export async function ratchetBaseKey(code, baseKey) {
  const suite = suiteOf(code);
  const secret = await hmac(suite.hash, new Uint8Array(suite.nh), baseKey);
  return hkdfExpand(suite.hash, secret, encoder.encode("SFrame 1.0 Ratchet"), suite.nh);
}

// -- the AEADs (section 4.5) -------------------------------------------------------------------

// The suite's AEAD under `key`: {encrypt(nonce, plaintext, aad), decrypt(nonce, ciphertext,
// aad)}; decrypt throws on a tag that does not verify.
export async function makeAead(code, key) {
  const suite = suiteOf(code);
  if (key.length !== suite.nk) fail("SFrameUsageError", `suite ${code} needs a ${suite.nk}-byte AEAD key`);
  if (suite.gcm) {
    const gcm = await subtle.importKey("raw", key, "AES-GCM", false, ["encrypt", "decrypt"]);
    const params = (iv, additionalData) => ({ name: "AES-GCM", iv, additionalData, tagLength: 128 });
    return {
      encrypt: async (nonce, plaintext, aad) => new Uint8Array(await subtle.encrypt(params(nonce, aad), gcm, plaintext)),
      decrypt: async (nonce, ciphertext, aad) => new Uint8Array(await subtle.decrypt(params(nonce, aad), gcm, ciphertext)),
    };
  }
  const aes = await subtle.importKey("raw", key.slice(0, suite.nka), "AES-CTR", false, ["encrypt"]);
  const mac = await subtle.importKey("raw", key.slice(suite.nka), { name: "HMAC", hash: suite.hash }, false, ["sign"]);
  // The initial counter block is the nonce followed by 32 zero bits.
  const ctr = (nonce, data) => subtle.encrypt({ name: "AES-CTR", counter: concat(nonce, new Uint8Array(4)), length: 32 }, aes, data);
  const tag = async (nonce, aad, ciphertext) => {
    const lengths = concat(bigBytes(BigInt(aad.length), 8), bigBytes(BigInt(ciphertext.length), 8), bigBytes(BigInt(suite.nt), 8));
    return new Uint8Array(await subtle.sign("HMAC", mac, concat(lengths, nonce, aad, ciphertext))).slice(0, suite.nt);
  };
  return {
    encrypt: async (nonce, plaintext, aad) => {
      const ciphertext = new Uint8Array(await ctr(nonce, plaintext));
      return concat(ciphertext, await tag(nonce, aad, ciphertext));
    },
    decrypt: async (nonce, data, aad) => {
      const body = data.length - suite.nt;
      if (body < 0) throw new Error("too short");
      const expected = await tag(nonce, aad, data.subarray(0, body));
      let difference = 0;
      for (let i = 0; i < suite.nt; i++) difference |= expected[i] ^ data[body + i];
      if (difference !== 0) throw new Error("tag mismatch");
      return new Uint8Array(await ctr(nonce, data.subarray(0, body)));
    },
  };
}

function nonceOf(salt, ctr) {
  const nonce = salt.slice();
  const counter = bigBytes(ctr, 8);
  for (let i = 0; i < 8; i++) nonce[nonce.length - 8 + i] ^= counter[i];
  return nonce;
}

async function keyState(code, kid, baseKey) {
  checkU64("kid", kid);
  if (baseKey.length < MIN_BASE_KEY_LENGTH) fail("SFrameUsageError", `base key must be at least ${MIN_BASE_KEY_LENGTH} bytes`);
  const { key, salt } = await deriveKeySalt(code, kid, baseKey);
  return { kid, aead: await makeAead(code, key), salt, nextCtr: 0n, highest: -1n, seen: 0n };
}

// -- contexts (section 4.4) ----------------------------------------------------------------------

// Encrypts frames under keys added by KID; a (key, CTR) pair is never used twice.
export class SendContext {
  constructor(suite) {
    suiteOf(suite);
    this.suite = suite;
    this.keys = new Map();
  }

  async addKey(kid, baseKey, nextCounter = 0n) {
    if (this.keys.has(kid)) fail("SFrameUsageError", `KID ${kid} already has a sending key; remove it first`);
    const state = await keyState(this.suite, kid, baseKey);
    state.nextCtr = nextCounter;
    this.keys.set(kid, state);
  }

  removeKey(kid) {
    if (!this.keys.delete(kid)) fail("SFrameUsageError", `no sending key for KID ${kid}`);
  }

  async protect(kid, plaintext, metadata = new Uint8Array(0)) {
    const state = this.keys.get(kid);
    if (!state) fail("SFrameUsageError", `no sending key for KID ${kid}`);
    const ctr = state.nextCtr;
    if (ctr > MAX_U64) fail("CounterExhaustedError", `CTR for KID ${kid} is exhausted; add a new key`);
    // Claimed before encrypting, so no failure can make it reusable.
    state.nextCtr = ctr + 1n;
    const header = encodeHeader(kid, ctr);
    return concat(header, await state.aead.encrypt(nonceOf(state.salt, ctr), plaintext, concat(header, metadata)));
  }
}

// Decrypts SFrame ciphertexts with keys added by KID, with a replay window of 128 CTRs per
// KID that moves only when a frame authenticates. `onFirstUse(kid)` is called once, when the
// first frame under a key authenticates.
export class ReceiveContext {
  constructor(suite, replayWindow = REPLAY_WINDOW) {
    suiteOf(suite);
    this.suite = suite;
    this.window = BigInt(replayWindow);
    this.mask = (1n << this.window) - 1n;
    this.keys = new Map();
  }

  async addKey(kid, baseKey, onFirstUse = null) {
    if (this.keys.has(kid)) fail("SFrameUsageError", `KID ${kid} already has a receiving key; remove it first`);
    const state = await keyState(this.suite, kid, baseKey);
    state.onFirstUse = onFirstUse;
    this.keys.set(kid, state);
  }

  removeKey(kid) {
    if (!this.keys.delete(kid)) fail("SFrameUsageError", `no receiving key for KID ${kid}`);
  }

  async unprotect(data, metadata = new Uint8Array(0)) {
    const { kid, ctr, length } = parseHeader(data);
    const state = this.keys.get(kid);
    if (!state) fail("UnknownKeyError", `no key for KID ${kid}`);
    const age = state.highest - ctr;
    if (age >= 0n) {
      if (age >= this.window) fail("ReplayError", `CTR ${ctr} for KID ${kid} is older than the replay window`);
      if ((state.seen >> age) & 1n) fail("ReplayError", `CTR ${ctr} for KID ${kid} was already accepted`);
    }
    let plaintext;
    try {
      plaintext = await state.aead.decrypt(nonceOf(state.salt, ctr), data.subarray(length), concat(data.subarray(0, length), metadata));
    } catch {
      fail("AuthenticationError", "SFrame authentication failed");
    }
    // Re-checked after the await: another frame with this CTR may have been accepted meanwhile.
    const now = state.highest - ctr;
    if (now >= 0n && (now >= this.window || (state.seen >> now) & 1n)) fail("ReplayError", `CTR ${ctr} for KID ${kid} was already accepted`);
    if (now < 0n) {
      const advance = -now;
      state.seen = advance >= this.window ? 1n : ((state.seen << advance) | 1n) & this.mask;
      state.highest = ctr;
    } else state.seen |= 1n << now;
    if (state.onFirstUse) {
      const notify = state.onFirstUse;
      state.onFirstUse = null;
      notify(kid);
    }
    return plaintext;
  }
}
