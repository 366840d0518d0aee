// blindhub's key agreement (protocol version 2), SAS, sealed channel and rekeys, with
// WebCrypto only: X25519, Ed25519, SHA-256/512, HMAC-SHA-256 and AES-256-GCM.
//
// The specification is docs/reference/key-agreement.md; the Python implementation is
// crypto/handshake.py, crypto/sealed.py and crypto/messages.py. tests/test_web_vectors.py runs
// tests/vectors/handshake.json through this module in Chromium and compares byte for byte.
// Randomness is a `randomBytes(n)` parameter, as in Python, so the vectors replay exactly.

const subtle = globalThis.crypto.subtle;
const encoder = new TextEncoder();
const strictDecoder = new TextDecoder("utf-8", { fatal: true });

export const PROTOCOL_VERSION = 2;
export const MAX_MESSAGE_SIZE = 64 * 1024;
export const MAX_CALL_ID_LENGTH = 128;
export const MAX_SEQUENCE = 2 ** 48;
export const MAX_EPOCH = 2 ** 31;
export const MAX_SEALED_CONTENT_SIZE = 32 * 1024;
export const MAX_NAME_LENGTH = 256;
const NONCE_SIZE = 32;
const HASH_SIZE = 32;
const SIGNATURE_SIZE = 64;
const KEY_SIZE = 32;
const NAME_FIELD_SIZE = 2 + 4 * MAX_NAME_LENGTH;
const AUTH_PLAINTEXT_SIZE = KEY_SIZE + SIGNATURE_SIZE + NAME_FIELD_SIZE;
const AUTH_SIZE = AUTH_PLAINTEXT_SIZE + 16;
const KIDS_PER_EPOCH = 2;
const SAS_DIGITS = 15n;
const LABEL_PREFIX = "blindhub-v2 ";
// The SFrame suites this peer supports, in the order it offers them (as `blindhub call`).
export const SUITES = [4, 5];
export const SUITE_NAMES = {
  1: "AES_128_CTR_HMAC_SHA256_80",
  2: "AES_128_CTR_HMAC_SHA256_64",
  3: "AES_128_CTR_HMAC_SHA256_32",
  4: "AES_128_GCM_SHA256_128",
  5: "AES_256_GCM_SHA512_128",
};

// -- errors: the Python class names, so both peers report a failure the same way ----------

export class ProtocolError extends Error {
  constructor(kind, message) {
    super(message);
    this.kind = kind;
  }
}
const fail = (kind, message) => {
  throw new ProtocolError(kind, message);
};
const malformed = (message) => fail("MalformedCallMessage", message);
const unexpected = (message) => fail("UnexpectedCallMessage", message);
const localError = (message) => fail("LocalError", message);

// -- bytes ------------------------------------------------------------------------------

export const utf8 = (text) => encoder.encode(text);

export function concat(...parts) {
  const out = new Uint8Array(parts.reduce((sum, part) => sum + part.length, 0));
  let offset = 0;
  for (const part of parts) {
    out.set(part, offset);
    offset += part.length;
  }
  return out;
}

export function uint(value, size) {
  const out = new Uint8Array(size);
  let rest = BigInt(value);
  for (let i = size - 1; i >= 0; i--) {
    out[i] = Number(rest & 0xffn);
    rest >>= 8n;
  }
  return out;
}

export function toBigInt(bytes) {
  let value = 0n;
  for (const byte of bytes) value = (value << 8n) | BigInt(byte);
  return value;
}

export function lengthPrefixed(...parts) {
  return concat(...parts.flatMap((part) => [uint(part.length, 4), part]));
}

export const hex = (bytes) => Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");

export function fromHex(text) {
  if (!/^(?:[0-9a-f]{2})*$/.test(text)) throw new TypeError("not lowercase hex");
  return Uint8Array.from(text.match(/../g) || [], (pair) => parseInt(pair, 16));
}

export function equalBytes(a, b) {
  if (a.length !== b.length) return false;
  let difference = 0;
  for (let i = 0; i < a.length; i++) difference |= a[i] ^ b[i];
  return difference === 0;
}

function base64(bytes) {
  let binary = "";
  for (const byte of bytes) binary += String.fromCharCode(byte);
  return btoa(binary).replace(/=+$/, "");
}

export const b64encode = (bytes) => base64(bytes).replace(/\+/g, "-").replace(/\//g, "_");

// The strict inverse of b64encode (crypto/identity.py b64decode): unpadded, canonical.
export function b64decode(text) {
  if (typeof text !== "string" || !/^[A-Za-z0-9_-]*$/.test(text) || text.length % 4 === 1) {
    throw new TypeError("not unpadded base64url text");
  }
  const binary = atob(text.replace(/-/g, "+").replace(/_/g, "/") + "=".repeat((4 - (text.length % 4)) % 4));
  const bytes = Uint8Array.from(binary, (char) => char.charCodeAt(0));
  if (b64encode(bytes) !== text) throw new TypeError("not canonical base64url");
  return bytes;
}

export const randomBytes = (size) => crypto.getRandomValues(new Uint8Array(size));

// -- strict JSON (crypto/strict_json.py) ---------------------------------------------------

const MAX_DEPTH = 32;
const LITERAL = /true|false|null|-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?/y;
const STRING = /"(?:[^"\\\u0000-\u001f]|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4}))*"/y;

// One strict JSON value: duplicate names, NaN, infinities, numbers beyond a double and
// nesting deeper than `maxDepth` are refused, as the Python peer refuses them, so one text
// never means two things to two readers. Returns the value.
export function strictParse(text, maxDepth = MAX_DEPTH) {
  let index = 0;
  const error = (message) => malformed(`not strict JSON: ${message} at ${index}`);
  const space = () => {
    while (index < text.length && " \t\n\r".includes(text[index])) index++;
  };
  const value = (depth) => {
    space();
    const char = text[index];
    if (char === "{" || char === "[") {
      if (depth + 1 > maxDepth) error(`nested deeper than ${maxDepth}`);
      index++;
      space();
      const isObject = char === "{";
      const result = isObject ? Object.create(null) : [];
      const close = isObject ? "}" : "]";
      if (text[index] === close) {
        index++;
        return result;
      }
      for (;;) {
        if (isObject) {
          space();
          if (text[index] !== '"') error("expected a name");
          const name = string();
          if (Object.prototype.hasOwnProperty.call(result, name)) error("duplicate name");
          space();
          if (text[index++] !== ":") error("expected ':'");
          result[name] = value(depth + 1);
        } else {
          result.push(value(depth + 1));
        }
        space();
        const next = text[index++];
        if (next === close) break;
        if (next !== ",") error("expected ',' or a close");
      }
      // A null-prototype object: a member named __proto__ is a member like any other.
      return result;
    }
    if (char === '"') return string();
    LITERAL.lastIndex = index;
    const literal = LITERAL.exec(text);
    if (!literal) error("expected a value");
    index += literal[0].length;
    if (literal[0] === "true") return true;
    if (literal[0] === "false") return false;
    if (literal[0] === "null") return null;
    const number = Number(literal[0]);
    if (!Number.isFinite(number)) error("a number out of range");
    return number;
  };
  const string = () => {
    STRING.lastIndex = index;
    const match = STRING.exec(text);
    if (!match) error("a malformed string");
    index += match[0].length;
    return JSON.parse(match[0]);
  };
  const result = value(0);
  space();
  if (index !== text.length) error("extra data");
  return result;
}

// Canonical JSON as the Python peer writes it (json.dumps, sorted names, no spaces, ASCII
// only): the sealed plaintexts are these bytes, so the vectors compare byte for byte.
export function canonicalJson(value) {
  const sorted = (item) => {
    if (Array.isArray(item)) return item.map(sorted);
    if (item !== null && typeof item === "object") {
      return Object.fromEntries(Object.keys(item).sort().map((key) => [key, sorted(item[key])]));
    }
    if (typeof item === "number" && !Number.isFinite(item)) localError("NaN and infinities are not JSON");
    return item;
  };
  return JSON.stringify(sorted(value)).replace(
    /[^\x20-\x7e]/g,
    (char) => "\\u" + char.charCodeAt(0).toString(16).padStart(4, "0"),
  );
}

// -- primitives ----------------------------------------------------------------------------

export const sha256 = async (data) => new Uint8Array(await subtle.digest("SHA-256", data));
export const sha512 = async (data) => new Uint8Array(await subtle.digest("SHA-512", data));

export async function hmac(hash, key, data) {
  const imported = await subtle.importKey("raw", key, { name: "HMAC", hash }, false, ["sign"]);
  return new Uint8Array(await subtle.sign("HMAC", imported, data));
}

// HKDF-Extract and -Expand (RFC 5869) with SHA-256, separately, as crypto/sealed.py uses them.
export const hkdfExtract = (salt, ikm) => hmac("SHA-256", salt, ikm);

export async function hkdfExpand(prk, label, context = new Uint8Array(0)) {
  return hmac("SHA-256", prk, concat(utf8(LABEL_PREFIX + label), context, Uint8Array.of(1)));
}

async function aesGcm(operation, key, nonce, data, associated) {
  const imported = await subtle.importKey("raw", key, "AES-GCM", false, [operation]);
  const params = { name: "AES-GCM", iv: nonce, additionalData: associated, tagLength: 128 };
  return new Uint8Array(await subtle[operation](params, imported, data));
}

const PKCS8_PREFIX = {
  Ed25519: fromHex("302e020100300506032b657004220420"),
  X25519: fromHex("302e020100300506032b656e04220420"),
};

// A private key from its 32 bytes (an Ed25519 seed or an X25519 scalar), and its public key.
async function importPrivate(algorithm, raw, usages, extractable = false) {
  const key = await subtle.importKey("pkcs8", concat(PKCS8_PREFIX[algorithm], raw), algorithm, true, usages);
  const publicKey = b64decode((await subtle.exportKey("jwk", key)).x);
  if (extractable) return { privateKey: key, publicKey };
  // Re-imported non-extractable: nothing in this page can read the private half back out.
  const fixed = await subtle.importKey("pkcs8", concat(PKCS8_PREFIX[algorithm], raw), algorithm, false, usages);
  return { privateKey: fixed, publicKey };
}

// An X25519 key pair from `randomBytes(32)`, the Python peer's draw.
export async function newEphemeral(random) {
  return importPrivate("X25519", random(KEY_SIZE), ["deriveBits"]);
}

export async function x25519(privateKey, peerPublic) {
  const peer = await subtle.importKey("raw", peerPublic, "X25519", false, []);
  try {
    return new Uint8Array(await subtle.deriveBits({ name: "X25519", public: peer }, privateKey, 256));
  } catch (error) {
    // WebCrypto refuses an all-zero secret, as the Python peer does.
    return malformed(`the peer's ephemeral key is a small-order point (${error.name})`);
  }
}

// -- identities (crypto/identity.py) ---------------------------------------------------------

export class Identity {
  // `privateKey`: a non-extractable Ed25519 CryptoKey; `publicKey`: its 32 raw bytes.
  constructor(privateKey, publicKey) {
    this.privateKey = privateKey;
    this.publicKey = publicKey;
  }

  static async fromSeed(seed) {
    const { privateKey, publicKey } = await importPrivate("Ed25519", seed, ["sign"]);
    return new Identity(privateKey, publicKey);
  }

  static async generate() {
    const pair = await subtle.generateKey("Ed25519", false, ["sign", "verify"]);
    return new Identity(pair.privateKey, new Uint8Array(await subtle.exportKey("raw", pair.publicKey)));
  }

  async sign(data) {
    return new Uint8Array(await subtle.sign("Ed25519", this.privateKey, data));
  }
}

export async function verifySignature(publicKey, data, signature) {
  let key;
  try {
    key = await subtle.importKey("raw", publicKey, "Ed25519", false, ["verify"]);
  } catch {
    return fail("MalformedIdentityKey", "not an Ed25519 public key");
  }
  if (!(await subtle.verify("Ed25519", key, signature, data))) fail("BadSignature", "the signature does not verify");
}

export async function fingerprint(publicKey) {
  return "SHA256:" + base64(await sha256(publicKey));
}

async function partyDigits(publicKey) {
  let digest = concat(uint(0, 2), publicKey);
  for (let i = 0; i < 5200; i++) digest = await sha512(concat(digest, publicKey));
  const groups = [];
  for (let i = 0; i < 7; i++) groups.push(String(toBigInt(digest.slice(5 * i, 5 * i + 5)) % 100000n).padStart(5, "0"));
  return groups.join(" ");
}

// The 70-digit safety number of two identity keys, the same on both ends.
export async function safetyNumber(first, second) {
  return [await partyDigits(first), await partyDigits(second)].sort().join(" ");
}

// -- names (crypto/names.py) ----------------------------------------------------------------

// The normal form of a name. The Python peer also requires every character to be UTS #39
// Identifier_Status Allowed, a property no browser exposes; here the closest test JavaScript
// has: letters, marks, decimal digits and the punctuation names use. A name the Python peer
// refuses is refused here too except for letters of scripts UTS #39 excludes (docs/howto).
const NAME_PUNCTUATION = new Set(["-", "'", ".", "\u00b7", "\u2019", "\u2010", "\u05f3", "\u05f4", "\u0f0b", "\u200c", "\u200d", "\u30a0", "\u30fb"]);
const REFUSED = /[\p{Cc}\p{Cf}\p{Cs}\p{Co}\p{Cn}\p{Zl}\p{Zp}\p{Default_Ignorable_Code_Point}]/u;

export function normalizeName(text) {
  if (typeof text !== "string") fail("InvalidName", "a name is text");
  let normal = text.normalize("NFKC");
  const refused = REFUSED.exec(normal);
  if (refused) fail("InvalidName", `a name has no control or invisible characters (U+${refused[0].codePointAt(0).toString(16).toUpperCase()})`);
  normal = normal.split(/[\s\u001c-\u001f\u0085]+/u).filter(Boolean).join(" ");
  if (normal.length === 0 || [...normal].length > MAX_NAME_LENGTH) fail("InvalidName", `a name is 1 to ${MAX_NAME_LENGTH} characters, not only spaces`);
  for (const char of normal) {
    if (char !== " " && !/^[\p{L}\p{M}\p{Nd}]$/u.test(char) && !NAME_PUNCTUATION.has(char)) {
      fail("InvalidName", `a name holds only letters, digits, marks, spaces and - ' . (not U+${char.codePointAt(0).toString(16).toUpperCase()})`);
    }
  }
  let base = "";
  let marks = [];
  for (const char of normal.normalize("NFD")) {
    if (!/^\p{M}$/u.test(char)) {
      base = /^[\p{L}\p{N}]$/u.test(char) ? char : "";
      marks = [];
      continue;
    }
    if (!base) fail("InvalidName", "a mark goes on a letter or digit");
    if (/^\p{Mn}$/u.test(char)) {
      if (marks.includes(char)) fail("InvalidName", "a name has no letter with the same mark twice");
      marks.push(char);
      if (marks.length > 4) fail("InvalidName", "a name has no letter with more than 4 marks");
    }
    if (char === "\u0307" && /^\p{Soft_Dotted}$/u.test(base)) fail("InvalidName", "a name has no dot above on a dotted letter");
  }
  if (!/[\p{L}\p{N}]/u.test(normal)) fail("InvalidName", "a name has at least one letter or digit");
  return normal;
}

function checkName(value) {
  if (typeof value !== "string" || value.length === 0 || [...value].length > MAX_NAME_LENGTH) {
    throw new TypeError(`is 1 to ${MAX_NAME_LENGTH} characters`);
  }
  if (normalizeName(value) !== value) throw new TypeError("is not normalised");
  return value;
}

// -- messages (crypto/messages.py) ----------------------------------------------------------

function checkCallId(value) {
  if (typeof value !== "string" || value.length === 0 || value.length > MAX_CALL_ID_LENGTH) {
    throw new TypeError(`a call id is 1 to ${MAX_CALL_ID_LENGTH} characters`);
  }
  if (/\p{Cs}/u.test(value.replace(/[\ud800-\udbff][\udc00-\udfff]/g, ""))) throw new TypeError("a call id is encodable as UTF-8");
  return value;
}

const bytesField = (size) => (value) => {
  const data = b64decode(value);
  if (data.length !== size) throw new TypeError(`is ${size} bytes`);
  return data;
};
const intField = (low, high) => (value) => {
  if (!Number.isInteger(value) || value < low || value > high) throw new TypeError(`is an integer from ${low} to ${high}`);
  return value;
};
const suiteField = (value) => {
  if (!Number.isInteger(value) || !(value in SUITE_NAMES)) throw new TypeError("is a registered SFrame cipher suite code");
  return value;
};
const suitesField = (value) => {
  if (!Array.isArray(value) || value.length === 0 || value.length > 5) throw new TypeError("is a list of 1 to 5 suite codes");
  const suites = value.map(suiteField);
  if (new Set(suites).size !== suites.length) throw new TypeError("lists each suite once");
  return suites;
};

const MESSAGE_FIELDS = {
  commit: { call_id: checkCallId, suites: suitesField, nonce: bytesField(NONCE_SIZE), commitment: bytesField(HASH_SIZE) },
  accept: { call_id: checkCallId, suite: suiteField, nonce: bytesField(NONCE_SIZE), ephemeral: bytesField(KEY_SIZE) },
  reveal: { call_id: checkCallId, ephemeral: bytesField(KEY_SIZE), auth: bytesField(AUTH_SIZE) },
  confirm: { call_id: checkCallId, auth: bytesField(AUTH_SIZE) },
  sealed: { epoch: intField(0, MAX_EPOCH), seq: intField(0, MAX_SEQUENCE), ciphertext: b64decode },
};

// The envelope's type, after checking the object, its size and its version.
export function messageType(message) {
  if (message === null || typeof message !== "object" || Array.isArray(message)) malformed("a message is a JSON object");
  if (utf8(canonicalJson(message)).length > MAX_MESSAGE_SIZE) malformed(`a message is at most ${MAX_MESSAGE_SIZE} bytes`);
  if (message.v !== PROTOCOL_VERSION) malformed(`unsupported protocol version; this is version ${PROTOCOL_VERSION}`);
  if (typeof message.type !== "string") malformed("a message has a string type");
  return message.type;
}

// Exactly the envelope and the fields of `kind`, each parsed.
export function parseMessage(message, kind) {
  const found = messageType(message);
  if (found !== kind) unexpected(`expected a '${kind}' message, got '${found}'`);
  const fields = MESSAGE_FIELDS[kind];
  const expected = ["v", "type", ...Object.keys(fields)].sort();
  if (Object.keys(message).sort().join() !== expected.join()) malformed(`a '${kind}' message has exactly the fields ${expected}`);
  const parsed = {};
  for (const [name, parse] of Object.entries(fields)) {
    try {
      parsed[name] = parse(message[name]);
    } catch (error) {
      malformed(`field '${name}': ${error.message}`);
    }
  }
  return parsed;
}

const envelope = (type, fields) => ({ v: PROTOCOL_VERSION, type, ...fields });

function encodeAuth(identity, name, signature) {
  const encoded = utf8(name);
  const field = new Uint8Array(NAME_FIELD_SIZE);
  field.set(uint(encoded.length, 2));
  field.set(encoded, 2);
  return concat(identity, signature, field);
}

function parseAuth(data) {
  if (data.length !== AUTH_PLAINTEXT_SIZE) malformed(`an identity plaintext is ${AUTH_PLAINTEXT_SIZE} bytes`);
  const identity = data.slice(0, KEY_SIZE);
  const signature = data.slice(KEY_SIZE, KEY_SIZE + SIGNATURE_SIZE);
  const field = data.slice(KEY_SIZE + SIGNATURE_SIZE);
  const length = (field[0] << 8) | field[1];
  if (length > NAME_FIELD_SIZE - 2 || field.slice(2 + length).some((byte) => byte !== 0)) {
    malformed("an identity plaintext pads its name with zero bytes");
  }
  let name;
  try {
    name = checkName(strictDecoder.decode(field.slice(2, 2 + length)));
  } catch (error) {
    malformed(`field 'name': ${error.message}`);
  }
  return { identity, name, signature };
}

// -- the key agreement (crypto/handshake.py) -----------------------------------------------

const Role = { INITIATOR: "initiator", RESPONDER: "responder" };
const peerRole = (role) => (role === Role.INITIATOR ? Role.RESPONDER : Role.INITIATOR);
const label = (text) => utf8(LABEL_PREFIX + text);

export async function commitment(callId, nonce, ephemeral) {
  return sha256(concat(label("commit"), lengthPrefixed(utf8(callId), nonce, ephemeral)));
}

function exchangeParts(exchange) {
  return [
    uint(PROTOCOL_VERSION, 2),
    Uint8Array.from(exchange.offered),
    Uint8Array.of(exchange.chosen),
    utf8(exchange.callId),
    exchange.initiatorNonce,
    exchange.responderNonce,
    exchange.initiatorEphemeral,
    exchange.responderEphemeral,
  ];
}

export const exchangeHash = (exchange) => sha256(concat(label("exchange"), lengthPrefixed(...exchangeParts(exchange))));

export const initiatorTranscriptHash = (exchange, initiator) =>
  sha256(concat(label("transcript initiator"), lengthPrefixed(...exchangeParts(exchange), initiator.identity, utf8(initiator.name))));

export const transcriptHash = (exchange, initiator, responder) =>
  sha256(
    concat(
      label("transcript"),
      lengthPrefixed(...exchangeParts(exchange), initiator.identity, utf8(initiator.name), responder.identity, utf8(responder.name)),
    ),
  );

const signedContent = (signer, transcript) => concat(label("signature " + signer), transcript);

export async function handshakeKeys(shared, exchange) {
  const prk = await hkdfExtract(exchange, shared);
  return { initiator: await hkdfExpand(prk, "auth initiator"), responder: await hkdfExpand(prk, "auth responder") };
}

const AUTH_NONCE = new Uint8Array(12);

async function sealAuth(keys, sender, identity, name, signature) {
  return aesGcm("encrypt", keys[sender], AUTH_NONCE, encodeAuth(identity, name, signature), label("auth " + sender));
}

async function openAuth(keys, sender, ciphertext) {
  let plaintext;
  try {
    plaintext = await aesGcm("decrypt", keys[sender], AUTH_NONCE, ciphertext, label("auth " + sender));
  } catch {
    fail("HandshakeDecryptionFailed", `the ${sender}'s identity does not open under this handshake's key`);
  }
  return parseAuth(plaintext);
}

export function renderSas(sasKey) {
  const digits = String(toBigInt(sasKey) % 10n ** SAS_DIGITS).padStart(Number(SAS_DIGITS), "0");
  return [0, 5, 10].map((start) => digits.slice(start, start + 5)).join(" ");
}

export async function deriveSas(shared, exchange) {
  return renderSas(await hkdfExpand(await hkdfExtract(exchange, shared), "sas"));
}

export async function epoch0Secret(shared, transcript) {
  return hkdfExpand(await hkdfExtract(transcript, shared), "epoch", uint(0, 4));
}

// One side of the key agreement. `peerCheck(name, identityKey)` runs with the peer's signed
// name and key before any call key exists, and throws to refuse. Any error moves the machine
// to "failed" for good, with its secrets dropped.
class Handshake {
  constructor(identity, name, callId, random, peerCheck) {
    try {
      checkCallId(callId);
      checkName(name);
    } catch (error) {
      localError(error.message);
    }
    Object.assign(this, { identity, name, callId, random, peerCheck, state: "start", result: null });
  }

  get me() {
    return { identity: this.identity.publicKey, name: this.name };
  }

  async receive(message) {
    if (this.state === "failed") localError("the handshake failed; start a new one");
    try {
      const kind = messageType(message);
      const handler = HANDLERS[`${this.state}:${kind}`];
      if (!handler) unexpected(`got '${kind}' in state ${this.state}`);
      const parsed = parseMessage(message, kind);
      if (parsed.call_id !== this.callId) fail("WrongCall", "message belongs to another call");
      return await handler.call(this, parsed);
    } catch (error) {
      this.state = "failed";
      this.ephemeral = this.shared = this.keys = null;
      throw error;
    }
  }

  async newEphemeral() {
    this.ephemeral = await newEphemeral(this.random);
    this.nonce = this.random(NONCE_SIZE);
  }

  async authenticatePeer(auth, transcript) {
    await verifySignature(auth.identity, signedContent(peerRole(this.role), transcript), auth.signature);
    const peer = { identity: auth.identity, name: auth.name };
    if (this.peerCheck) await this.peerCheck(peer.name, peer.identity);
    return peer;
  }

  async finish(exchange, shared, transcript, peer) {
    const secret = await epoch0Secret(shared, transcript);
    const channel = await SealedChannel.create(this.role, this.callId, secret, this.random, {
      identity: this.identity,
      peerIdentity: peer.identity,
      transcriptHash: transcript,
    });
    this.result = {
      role: this.role,
      callId: this.callId,
      suite: exchange.chosen,
      initialKeys: { installReceive: channel.keys.receive, switchSend: channel.keys.send },
      sas: await deriveSas(shared, await exchangeHash(exchange)),
      peerIdentity: peer.identity,
      peerName: peer.name,
      transcriptHash: transcript,
      channel,
    };
    this.ephemeral = this.shared = this.keys = null;
    this.state = "done";
  }
}

export class Initiator extends Handshake {
  constructor(identity, callId, suites, random, { name, peerCheck = null }) {
    super(identity, name, callId, random, peerCheck);
    this.role = Role.INITIATOR;
    if (suites.length === 0 || new Set(suites).size !== suites.length) localError("offer at least one suite, each once");
    this.suites = [...suites];
  }

  async start() {
    if (this.state !== "start") localError("start() is called once");
    await this.newEphemeral();
    this.state = "await-accept";
    return envelope("commit", {
      call_id: this.callId,
      suites: this.suites,
      nonce: b64encode(this.nonce),
      commitment: b64encode(await commitment(this.callId, this.nonce, this.ephemeral.publicKey)),
    });
  }

  async onAccept(accept) {
    if (!this.suites.includes(accept.suite)) malformed("the responder chose a suite that was not offered");
    const exchange = {
      offered: this.suites,
      chosen: accept.suite,
      callId: this.callId,
      initiatorNonce: this.nonce,
      responderNonce: accept.nonce,
      initiatorEphemeral: this.ephemeral.publicKey,
      responderEphemeral: accept.ephemeral,
    };
    const shared = await x25519(this.ephemeral.privateKey, accept.ephemeral);
    const keys = await handshakeKeys(shared, await exchangeHash(exchange));
    const signature = await this.identity.sign(signedContent(this.role, await initiatorTranscriptHash(exchange, this.me)));
    const auth = await sealAuth(keys, this.role, this.identity.publicKey, this.name, signature);
    Object.assign(this, { exchange, shared, keys, state: "await-confirm" });
    return [envelope("reveal", { call_id: this.callId, ephemeral: b64encode(this.ephemeral.publicKey), auth: b64encode(auth) })];
  }

  async onConfirm(confirm) {
    const auth = await openAuth(this.keys, peerRole(this.role), confirm.auth);
    const transcript = await transcriptHash(this.exchange, this.me, auth);
    const peer = await this.authenticatePeer(auth, transcript);
    await this.finish(this.exchange, this.shared, transcript, peer);
    return [];
  }
}

export class Responder extends Handshake {
  constructor(identity, callId, suites, random, { name, peerCheck = null }) {
    super(identity, name, callId, random, peerCheck);
    this.role = Role.RESPONDER;
    if (suites.length === 0) localError("support at least one suite");
    this.suites = new Set(suites);
    this.state = "await-commit";
  }

  async onCommit(commit) {
    const chosen = commit.suites.find((suite) => this.suites.has(suite));
    if (chosen === undefined) fail("NoCommonSuite", "no offered SFrame cipher suite is supported here");
    Object.assign(this, { commit, chosen });
    await this.newEphemeral();
    this.state = "await-reveal";
    return [envelope("accept", { call_id: this.callId, suite: chosen, nonce: b64encode(this.nonce), ephemeral: b64encode(this.ephemeral.publicKey) })];
  }

  async onReveal(reveal) {
    const { commit, chosen } = this;
    if (!equalBytes(await commitment(this.callId, commit.nonce, reveal.ephemeral), commit.commitment)) {
      fail("CommitmentMismatch", "the commit does not match the revealed ephemeral");
    }
    const exchange = {
      offered: commit.suites,
      chosen,
      callId: this.callId,
      initiatorNonce: commit.nonce,
      responderNonce: this.nonce,
      initiatorEphemeral: reveal.ephemeral,
      responderEphemeral: this.ephemeral.publicKey,
    };
    const shared = await x25519(this.ephemeral.privateKey, reveal.ephemeral);
    const keys = await handshakeKeys(shared, await exchangeHash(exchange));
    const auth = await openAuth(keys, peerRole(this.role), reveal.auth);
    const peer = await this.authenticatePeer(auth, await initiatorTranscriptHash(exchange, auth));
    // Our own identity leaves only now, once the initiator has proved who it is.
    const transcript = await transcriptHash(exchange, peer, this.me);
    const signature = await this.identity.sign(signedContent(this.role, transcript));
    const confirm = await sealAuth(keys, this.role, this.identity.publicKey, this.name, signature);
    await this.finish(exchange, shared, transcript, peer);
    return [envelope("confirm", { call_id: this.callId, auth: b64encode(confirm) })];
  }
}

const HANDLERS = {
  "await-commit:commit": Responder.prototype.onCommit,
  "await-accept:accept": Initiator.prototype.onAccept,
  "await-reveal:reveal": Responder.prototype.onReveal,
  "await-confirm:confirm": Initiator.prototype.onConfirm,
};

// -- epochs and the sealed channel (crypto/sealed.py) --------------------------------------

// Both directions' SFrame base keys and sealing keys of one epoch, from `role`'s side.
export async function deriveEpochKeys(secret, epoch, role) {
  const media = async (sender) => ({
    epoch,
    kid: KIDS_PER_EPOCH * epoch + (sender === Role.INITIATOR ? 0 : 1),
    baseKey: await hkdfExpand(secret, "sframe " + sender),
  });
  return {
    epoch,
    send: await media(role),
    receive: await media(peerRole(role)),
    sealSend: await hkdfExpand(secret, "seal " + role),
    sealReceive: await hkdfExpand(secret, "seal " + peerRole(role)),
  };
}

export async function nextEpochSecret(secret, epoch, shared, requester, accepter) {
  return hkdfExpand(await hkdfExtract(secret, shared), "epoch", concat(uint(epoch, 4), requester, accepter));
}

const rekeySignedContent = (kind, signer, callId, transcript, epoch, ...ephemerals) =>
  concat(label(`${kind} ${signer}`), lengthPrefixed(utf8(callId), transcript, uint(epoch, 4), ...ephemerals));

const sealedNonce = (sequence) => concat(new Uint8Array(4), uint(sequence, 8));

function innerFields(obj, kind, names) {
  if (obj === null || typeof obj !== "object" || Array.isArray(obj)) malformed("a sealed plaintext is a JSON object");
  if (obj.kind !== kind) unexpected(`expected a '${kind}' sealed message, got '${obj.kind}'`);
  if (Object.keys(obj).sort().join() !== ["kind", ...names].sort().join()) malformed(`a '${kind}' message has fields ${["kind", ...names]}`);
  return obj;
}

function parseRekeyFields(obj, kind) {
  const fields = innerFields(obj, kind, ["epoch", "ephemeral", "signature"]);
  if (!Number.isInteger(fields.epoch)) malformed(`the epoch of a '${kind}' message is an integer`);
  const decode = (value, size, what) => {
    try {
      return bytesField(size)(value);
    } catch {
      return malformed(`a rekey ${what}`);
    }
  };
  return {
    epoch: fields.epoch,
    ephemeral: decode(fields.ephemeral, KEY_SIZE, "ephemeral is a 32-byte X25519 key"),
    signature: decode(fields.signature, SIGNATURE_SIZE, "signature is a 64-byte Ed25519 signature"),
  };
}

const INNER_PARSERS = {
  app: (obj) => {
    const { content } = innerFields(obj, "app", ["content"]);
    if (content === null || typeof content !== "object" || Array.isArray(content)) malformed("an application message carries one JSON object");
    return { content };
  },
  rekey: (obj) => parseRekeyFields(obj, "rekey"),
  "rekey-ack": (obj) => parseRekeyFields(obj, "rekey-ack"),
  "rekey-done": (obj) => {
    const { epoch } = innerFields(obj, "rekey-done", ["epoch"]);
    if (!Number.isInteger(epoch)) malformed("the epoch of a 'rekey-done' message is an integer");
    return { epoch };
  },
  "sender-key": (obj) => {
    const fields = innerFields(obj, "sender-key", ["suite", "generation", "step", "base_key"]);
    const parsers = { suite: suiteField, generation: intField(0, MAX_SENDER_KEY_GENERATION), step: intField(0, MAX_SENDER_KEY_STEP), base_key: b64decode };
    const parsed = {};
    for (const [name, parse] of Object.entries(parsers)) {
      try {
        parsed[name] = parse(fields[name]);
      } catch (error) {
        malformed(`field '${name}' of a 'sender-key' message: ${error.message}`);
      }
    }
    const nh = SENDER_KEY_SIZES[parsed.suite];
    if (parsed.base_key.length !== nh) malformed(`field 'base_key' of a 'sender-key' message: is ${nh} bytes for its suite`);
    return { suite: parsed.suite, generation: parsed.generation, step: parsed.step, baseKey: parsed.base_key };
  },
  "sender-key-ack": (obj) => {
    const { kid } = innerFields(obj, "sender-key-ack", ["kid"]);
    if (!Number.isInteger(kid) || kid < 0 || kid > MAX_SENDER_KEY_KID) malformed(`field 'kid' of a 'sender-key-ack' message: is an integer from 0 to ${MAX_SENDER_KEY_KID}`);
    return { kid };
  },
};

// Group sender keys (crypto/sender_keys.py): generations and steps below 2^31, KID =
// generation << 8 | step % 256, a base key of the suite's Nh bytes.
const MAX_SENDER_KEY_GENERATION = 2 ** 31;
const MAX_SENDER_KEY_STEP = 2 ** 31;
const MAX_SENDER_KEY_KID = MAX_SENDER_KEY_GENERATION * 256 + 255;
const SENDER_KEY_SIZES = { 1: 32, 2: 32, 3: 32, 4: 32, 5: 64 };

// The sealed plaintexts of a sender key and of its acknowledgement, before canonical JSON.
export const senderKeyInner = (key) => ({ kind: "sender-key", suite: key.suite, generation: key.generation, step: key.step, base_key: b64encode(key.baseKey) });
export const senderKeyAckInner = (kid) => ({ kind: "sender-key-ack", kid });

// A sealed plaintext object parsed as the channel parses it (tests read the vectors with it).
export function parseInner(inner) {
  const kind = inner && typeof inner.kind === "string" ? inner.kind : null;
  if (kind === null || !Object.prototype.hasOwnProperty.call(INNER_PARSERS, kind)) malformed("unknown sealed message kind");
  return INNER_PARSERS[kind](inner);
}

// Sealed signalling in both directions and the epochs of the call's keys; `open` returns
// {content, replies, keys: {installReceive, switchSend}}, as crypto.sealed.Received.
export class SealedChannel {
  static async create(role, callId, secret, random, { identity, peerIdentity, transcriptHash }) {
    const channel = new SealedChannel();
    const keys = await deriveEpochKeys(secret, 0, role);
    Object.assign(channel, {
      role,
      callId,
      random,
      identity,
      peerIdentity,
      transcriptHash,
      secret,
      keys,
      sendKey: keys.sealSend,
      sendEpoch: 0,
      sendSequence: 0,
      receiveKey: keys.sealReceive,
      receiveEpoch: 0,
      receiveSequence: 0,
      highestSeen: -1,
      rekey: { state: "idle" },
    });
    return channel;
  }

  get epoch() {
    return this.keys.epoch;
  }

  get rekeyInProgress() {
    return this.rekey.state !== "idle";
  }

  async seal(content) {
    if (content === null || typeof content !== "object" || Array.isArray(content)) localError("sealed content is a JSON object");
    return this.sealInner({ kind: "app", content });
  }

  // A group call's sender key for the peer, and the acknowledgement of the peer's.
  sealSenderKey(key) {
    return this.sealInner(senderKeyInner(key));
  }

  sealSenderKeyAck(kid) {
    return this.sealInner(senderKeyAckInner(kid));
  }

  async startRekey() {
    if (this.rekeyInProgress) localError("a rekey is already in progress");
    if (this.epoch + 1 > MAX_EPOCH) localError("no epochs left in this call");
    const pair = await newEphemeral(this.random);
    const epoch = this.epoch + 1;
    const signature = await this.sign("rekey", epoch, pair.publicKey);
    this.rekey = { state: "requested", epoch, pair };
    return this.sealInner({ kind: "rekey", epoch, ephemeral: b64encode(pair.publicKey), signature: b64encode(signature) });
  }

  sign(kind, epoch, ...ephemerals) {
    return this.identity.sign(rekeySignedContent(kind, this.role, this.callId, this.transcriptHash, epoch, ...ephemerals));
  }

  verify(kind, signature, epoch, ...ephemerals) {
    const content = rekeySignedContent(kind, peerRole(this.role), this.callId, this.transcriptHash, epoch, ...ephemerals);
    return verifySignature(this.peerIdentity, content, signature);
  }

  associatedData(sender, epoch, sequence) {
    return concat(label("sealed"), lengthPrefixed(utf8(this.callId)), utf8(sender === Role.INITIATOR ? "I" : "R"), uint(epoch, 4), uint(sequence, 8));
  }

  async sealInner(inner) {
    const plaintext = utf8(canonicalJson(inner));
    if (plaintext.length > MAX_SEALED_CONTENT_SIZE) localError(`sealed content is at most ${MAX_SEALED_CONTENT_SIZE} bytes`);
    if (this.sendSequence >= MAX_SEQUENCE) localError("no sequence numbers left in this call");
    const sequence = this.sendSequence;
    const associated = this.associatedData(this.role, this.sendEpoch, sequence);
    const ciphertext = await aesGcm("encrypt", this.sendKey, sealedNonce(sequence), plaintext, associated);
    this.sendSequence += 1;
    return envelope("sealed", { epoch: this.sendEpoch, seq: sequence, ciphertext: b64encode(ciphertext) });
  }

  async open(message) {
    const sealed = parseMessage(message, "sealed");
    const { epoch, seq } = sealed;
    const awaiting = this.rekey.state === "awaiting-done" ? this.rekey : null;
    let key;
    if (epoch < this.receiveEpoch) fail("SealedReplay", `message from epoch ${epoch}, whose keys are erased`);
    if (epoch === this.receiveEpoch) key = this.receiveKey;
    else if (awaiting && epoch === awaiting.keys.epoch) key = awaiting.keys.sealReceive;
    else fail("DecryptionFailed", `no key for epoch ${epoch}`);
    let plaintext;
    try {
      plaintext = await aesGcm("decrypt", key, sealedNonce(seq), sealed.ciphertext, this.associatedData(peerRole(this.role), epoch, seq));
    } catch {
      fail("DecryptionFailed", "sealed message does not authenticate");
    }
    this.checkSequence(seq);
    if (plaintext.length > MAX_MESSAGE_SIZE) malformed("a sealed plaintext is too large");
    let inner;
    try {
      inner = strictParse(strictDecoder.decode(plaintext));
    } catch (error) {
      malformed(`a sealed plaintext is strict JSON: ${error.message}`);
    }
    if (inner === null || typeof inner !== "object" || Array.isArray(inner)) malformed("a message is a JSON object");
    if (awaiting && epoch === awaiting.keys.epoch && inner.kind !== "rekey-done") {
      unexpected("the first message of a new epoch is 'rekey-done'");
    }
    const received = await this.dispatch(inner);
    this.receiveSequence += 1;
    return received;
  }

  checkSequence(sequence) {
    const expected = this.receiveSequence;
    if (sequence < expected) fail("SealedReplay", `sealed message ${sequence} was already delivered`);
    if (sequence > expected) {
      this.highestSeen = Math.max(this.highestSeen, sequence);
      fail("SealedGap", `sealed message ${sequence} arrived while ${expected} is missing`);
    }
    if (this.highestSeen > sequence) fail("SealedReorder", `sealed message ${sequence} arrived after message ${this.highestSeen}`);
  }

  async dispatch(inner) {
    const kind = typeof inner.kind === "string" ? inner.kind : null;
    const parse = kind !== null && Object.prototype.hasOwnProperty.call(INNER_PARSERS, kind) ? INNER_PARSERS[kind] : null;
    if (!parse) malformed("unknown sealed message kind");
    const handler = INNER_HANDLERS[`${this.rekey.state}:${kind}`];
    if (!handler) unexpected(`a '${kind}' message is not accepted in rekey state ${this.rekey.state}`);
    return handler.call(this, parse(inner));
  }

  onApp(message) {
    return { content: message.content, replies: [], keys: {} };
  }

  onSenderKey(senderKey) {
    return { content: null, replies: [], keys: {}, senderKey };
  }

  onSenderKeyAck({ kid }) {
    return { content: null, replies: [], keys: {}, senderKeyAck: kid };
  }

  async onRekey(message) {
    if (message.epoch !== this.epoch + 1) unexpected(`a rekey to epoch ${message.epoch} is not expected now`);
    await this.verify("rekey", message.signature, message.epoch, message.ephemeral);
    const pair = await newEphemeral(this.random);
    const shared = await x25519(pair.privateKey, message.ephemeral);
    const signature = await this.sign("rekey-ack", message.epoch, message.ephemeral, pair.publicKey);
    const ack = await this.sealInner({ kind: "rekey-ack", epoch: message.epoch, ephemeral: b64encode(pair.publicKey), signature: b64encode(signature) });
    const keys = await this.advance(message.epoch, shared, message.ephemeral, pair.publicKey);
    this.sendKey = keys.sealSend;
    this.sendEpoch = message.epoch;
    this.rekey = { state: "awaiting-done", keys };
    return { content: null, replies: [ack], keys: { installReceive: keys.receive } };
  }

  async onRekeyWhileRequested(message) {
    // Both asked at once: the handshake initiator's request wins.
    if (message.epoch !== this.epoch + 1) unexpected(`a rekey to epoch ${message.epoch} is not expected now`);
    if (this.role === Role.INITIATOR) {
      await this.verify("rekey", message.signature, message.epoch, message.ephemeral);
      return { content: null, replies: [], keys: {} };
    }
    return this.onRekey(message);
  }

  async onRekeyAck(message) {
    const pending = this.rekey;
    if (message.epoch !== pending.epoch) unexpected(`no rekey to epoch ${message.epoch} was requested`);
    await this.verify("rekey-ack", message.signature, message.epoch, pending.pair.publicKey, message.ephemeral);
    const shared = await x25519(pending.pair.privateKey, message.ephemeral);
    const keys = await this.advance(message.epoch, shared, pending.pair.publicKey, message.ephemeral);
    this.rekey = { state: "idle" };
    this.receiveKey = keys.sealReceive;
    this.receiveEpoch = message.epoch;
    this.sendKey = keys.sealSend;
    this.sendEpoch = message.epoch;
    const done = await this.sealInner({ kind: "rekey-done", epoch: message.epoch });
    return { content: null, replies: [done], keys: { installReceive: keys.receive, switchSend: keys.send } };
  }

  onRekeyDone(message) {
    const awaiting = this.rekey;
    if (message.epoch !== awaiting.keys.epoch) unexpected(`no rekey to epoch ${message.epoch} awaits completion`);
    this.receiveKey = awaiting.keys.sealReceive;
    this.receiveEpoch = message.epoch;
    this.rekey = { state: "idle" };
    return { content: null, replies: [], keys: { switchSend: awaiting.keys.send } };
  }

  async advance(epoch, shared, requester, accepter) {
    this.secret = await nextEpochSecret(this.secret, epoch, shared, requester, accepter);
    this.keys = await deriveEpochKeys(this.secret, epoch, this.role);
    return this.keys;
  }
}

// The application's and the group sender keys' messages are accepted in every rekey state:
// they do not touch the pairwise epochs.
const INNER_HANDLERS = {
  ...Object.fromEntries(
    ["idle", "requested", "awaiting-done"].flatMap((state) => [
      [`${state}:sender-key`, SealedChannel.prototype.onSenderKey],
      [`${state}:sender-key-ack`, SealedChannel.prototype.onSenderKeyAck],
    ]),
  ),
  "idle:app": SealedChannel.prototype.onApp,
  "idle:rekey": SealedChannel.prototype.onRekey,
  "requested:app": SealedChannel.prototype.onApp,
  "requested:rekey": SealedChannel.prototype.onRekeyWhileRequested,
  "requested:rekey-ack": SealedChannel.prototype.onRekeyAck,
  "awaiting-done:app": SealedChannel.prototype.onApp,
  "awaiting-done:rekey-done": SealedChannel.prototype.onRekeyDone,
};
