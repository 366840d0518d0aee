// This browser's identity and pins, in IndexedDB (the equivalents of identity.json and
// known_peers.json, crypto/identity.py). The identity's private key is a non-extractable
// WebCrypto key: IndexedDB keeps the CryptoKey object, and no script, this page's included,
// can read its bytes back out.

import { Identity, b64decode, b64encode, fingerprint } from "./protocol.js";

const DB_NAME = "blindhub";

function open() {
  return new Promise((resolve, reject) => {
    const request = indexedDB.open(DB_NAME, 1);
    request.onupgradeneeded = () => {
      request.result.createObjectStore("identity");
      request.result.createObjectStore("pins", { keyPath: "name" });
    };
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
}

async function transaction(store, mode, operation) {
  const db = await open();
  try {
    return await new Promise((resolve, reject) => {
      const tx = db.transaction(store, mode);
      const request = operation(tx.objectStore(store));
      tx.oncomplete = () => resolve(request.result);
      tx.onerror = () => reject(tx.error);
    });
  } finally {
    db.close();
  }
}

// This browser's identity, created (non-extractable) on first use.
export async function loadIdentity() {
  const stored = await transaction("identity", "readonly", (store) => store.get("self"));
  if (stored) return new Identity(stored.privateKey, new Uint8Array(stored.publicKey));
  const identity = await Identity.generate();
  await transaction("identity", "readwrite", (store) => store.add({ privateKey: identity.privateKey, publicKey: identity.publicKey }, "self"));
  return identity;
}

// A name pinned to another key (or a look-alike of one): the call is refused before any call
// key exists. `name` is the name the peer signed, `presented` the fingerprint of its key.
export class PinnedIdentityMismatch extends Error {
  constructor(message, name, presented) {
    super(message);
    Object.assign(this, { kind: "PinnedIdentityMismatch", name, presented });
  }
}

// Pins by peer name, like SSH's known_hosts: the first key seen is pinned, another key later
// is refused with both fingerprints and the pin left in place.
export const pins = {
  get: (name) => transaction("pins", "readonly", (store) => store.get(name)),
  all: () => transaction("pins", "readonly", (store) => store.getAll()),
  remove: (name) => transaction("pins", "readwrite", (store) => store.delete(name)),

  // The pin for `name`, pinning `publicKey` on first sight; {pin, isNew}.
  async check(name, publicKey) {
    const pin = await pins.get(name);
    if (pin) {
      const pinned = b64decode(pin.publicKey);
      if (b64encode(pinned) !== b64encode(publicKey)) {
        const presented = await fingerprint(publicKey);
        throw new PinnedIdentityMismatch(
          `identity key for peer '${name}' changed: pinned ${await fingerprint(pinned)}, presented ${presented}; the pin was not replaced`,
          name,
          presented,
        );
      }
      return { pin, isNew: false };
    }
    // Look-alike names (crypto/names.py) are caught here only when they differ by case:
    // browsers expose no UTS #39 confusable skeleton.
    const folded = name.toLowerCase();
    const lookAlike = (await pins.all()).find((other) => other.name.toLowerCase() === folded);
    if (lookAlike) {
      const [pinned, presented] = [await fingerprint(b64decode(lookAlike.publicKey)), await fingerprint(publicKey)];
      throw new PinnedIdentityMismatch(
        `peer name '${name}' looks like the pinned '${lookAlike.name}': pinned ${pinned}, presented ${presented}; refused as a changed key, and nothing was pinned`,
        name,
        presented,
      );
    }
    const created = { name, publicKey: b64encode(publicKey), verified: false };
    await transaction("pins", "readwrite", (store) => store.add(created));
    return { pin: created, isNew: true };
  },

  async markVerified(name) {
    const pin = await pins.get(name);
    if (pin) await transaction("pins", "readwrite", (store) => store.put({ ...pin, verified: true }));
  },
};
