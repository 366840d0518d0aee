// Run in the served page by tests/test_web_vectors.py (page.evaluate): the published vectors
// through client/web/protocol.js and client/web/sframe.js, byte for byte. Returns
// {checked, mismatches}: the number of values compared and a description of each mismatch.
async ({ handshake, randomStreams, sframe }) => {
  const p = await import("/protocol.js");
  const s = await import("/sframe.js");
  const mismatches = [];
  let checked = 0;
  const same = (what, actual, expected) => {
    checked++;
    if (actual !== expected) mismatches.push(`${what}: got ${actual}, expected ${expected}`);
  };
  const sameJson = (what, actual, expected) => same(what, p.canonicalJson(actual), p.canonicalJson(expected));

  // -- the key agreement, the sealed message and the rekey (tests/vectors/handshake.json)
  const stream = (label) => {
    const blocks = randomStreams[label].map(p.fromHex);
    return (size) => {
      if (size !== 32) throw new Error(`the vectors draw 32 bytes at a time, not ${size}`);
      return blocks.shift();
    };
  };
  const inputs = handshake.inputs;
  const alice = await p.Identity.fromSeed(p.fromHex(inputs.initiator_identity_seed));
  const bob = await p.Identity.fromSeed(p.fromHex(inputs.responder_identity_seed));
  same("initiator identity", p.b64encode(alice.publicKey), handshake.identities.initiator_public);
  same("responder identity", p.b64encode(bob.publicKey), handshake.identities.responder_public);
  const initiator = new p.Initiator(alice, inputs.call_id, inputs.offered_suites, stream(inputs.initiator_random_label), { name: inputs.initiator_name });
  const responder = new p.Responder(bob, inputs.call_id, inputs.responder_supported_suites, stream(inputs.responder_random_label), { name: inputs.responder_name });
  const messages = handshake.messages;
  const commit = await initiator.start();
  sameJson("commit", commit, messages.commit);
  const [accept] = await responder.receive(messages.commit);
  sameJson("accept", accept, messages.accept);
  const [reveal] = await initiator.receive(messages.accept);
  sameJson("reveal", reveal, messages.reveal);
  const [confirm] = await responder.receive(messages.reveal);
  sameJson("confirm", confirm, messages.confirm);
  same("initiator done", (await initiator.receive(messages.confirm)).length, 0);

  const mine = initiator.result;
  const theirs = responder.result;
  for (const [who, result] of [["initiator", mine], ["responder", theirs]]) {
    same(`${who} SAS`, result.sas, handshake.sas);
    same(`${who} T`, p.hex(result.transcriptHash), handshake.transcript_hash);
    same(`${who} suite`, result.suite, handshake.suite);
  }
  same("initiator sees", mine.peerName, inputs.responder_name);
  same("responder sees", theirs.peerName, inputs.initiator_name);

  // The intermediate values, from the messages and the primitives.
  const exchange = {
    offered: inputs.offered_suites,
    chosen: messages.accept.suite,
    callId: inputs.call_id,
    initiatorNonce: p.b64decode(messages.commit.nonce),
    responderNonce: p.b64decode(messages.accept.nonce),
    initiatorEphemeral: p.b64decode(messages.reveal.ephemeral),
    responderEphemeral: p.b64decode(messages.accept.ephemeral),
  };
  const x = await p.exchangeHash(exchange);
  same("X", p.hex(x), handshake.handshake.exchange_hash);
  same("T_i", p.hex(await p.initiatorTranscriptHash(exchange, { identity: alice.publicKey, name: inputs.initiator_name })), handshake.handshake.initiator_transcript_hash);
  same("commitment", p.b64encode(await p.commitment(inputs.call_id, exchange.initiatorNonce, exchange.initiatorEphemeral)), messages.commit.commitment);

  const epoch = (what, keys, expected) => {
    // The initiator's view: its send keys are the initiator's.
    same(`${what} sframe initiator key`, p.hex(keys.send.baseKey), expected.sframe_initiator.base_key);
    same(`${what} sframe initiator kid`, keys.send.kid, expected.sframe_initiator.kid);
    same(`${what} sframe responder key`, p.hex(keys.receive.baseKey), expected.sframe_responder.base_key);
    same(`${what} sframe responder kid`, keys.receive.kid, expected.sframe_responder.kid);
    same(`${what} seal initiator`, p.hex(keys.sealSend), expected.seal_initiator);
    same(`${what} seal responder`, p.hex(keys.sealReceive), expected.seal_responder);
  };
  epoch("epoch 0", mine.channel.keys, handshake.epoch0);
  same("responder's epoch 0 send key", p.hex(theirs.channel.keys.send.baseKey), handshake.epoch0.sframe_responder.base_key);

  const sealed = await mine.channel.seal(handshake.sealed.content);
  sameJson("sealed", sealed, handshake.sealed.message);
  sameJson("opened", (await theirs.channel.open(handshake.sealed.message)).content, handshake.sealed.content);

  const rekeyMessages = handshake.rekey.messages;
  sameJson("rekey", await mine.channel.startRekey(), rekeyMessages.rekey);
  const acked = await theirs.channel.open(rekeyMessages.rekey);
  sameJson("rekey-ack", acked.replies[0], rekeyMessages["rekey-ack"]);
  same("accepter installs", acked.keys.installReceive.kid, handshake.rekey.epoch1.sframe_initiator.kid);
  const done = await mine.channel.open(rekeyMessages["rekey-ack"]);
  sameJson("rekey-done", done.replies[0], rekeyMessages["rekey-done"]);
  same("requester switches", done.keys.switchSend.kid, handshake.rekey.epoch1.sframe_initiator.kid);
  const finished = await theirs.channel.open(rekeyMessages["rekey-done"]);
  same("accepter switches", finished.keys.switchSend.kid, handshake.rekey.epoch1.sframe_responder.kid);
  epoch("epoch 1", mine.channel.keys, handshake.rekey.epoch1);

  // A replayed sealed message and a flipped bit are refused, as in Python.
  const refusal = async (what, message, kind) => {
    checked++;
    try {
      await theirs.channel.open(message);
      mismatches.push(`${what}: accepted`);
    } catch (error) {
      if (error.kind !== kind) mismatches.push(`${what}: ${error.kind} (${error.message}), expected ${kind}`);
    }
  };
  await refusal("replayed rekey-done", rekeyMessages["rekey-done"], "SealedReplay");
  const flipped = { ...rekeyMessages["rekey-done"], ciphertext: rekeyMessages["rekey-done"].ciphertext.replace(/^./, (c) => (c === "A" ? "B" : "A")) };
  await refusal("altered message", flipped, "DecryptionFailed");

  // -- SFrame (tests/vectors/sframe/test-vectors.json, RFC 9605)
  for (const vector of sframe.header) {
    const kid = BigInt(vector.kid);
    const ctr = BigInt(vector.ctr);
    same(`header ${vector.kid}/${vector.ctr}`, p.hex(s.encodeHeader(kid, ctr)), vector.encoded);
    const parsed = s.parseHeader(p.fromHex(vector.encoded));
    same(`parsed header ${vector.encoded}`, `${parsed.kid}/${parsed.ctr}/${parsed.length}`, `${kid}/${ctr}/${vector.encoded.length / 2}`);
  }
  for (const vector of sframe.aes_ctr_hmac) {
    const aead = await s.makeAead(vector.cipher_suite, p.fromHex(vector.key));
    const ct = await aead.encrypt(p.fromHex(vector.nonce), p.fromHex(vector.pt), p.fromHex(vector.aad));
    same(`aes_ctr_hmac ${vector.cipher_suite} ct`, p.hex(ct), vector.ct);
    const pt = await aead.decrypt(p.fromHex(vector.nonce), p.fromHex(vector.ct), p.fromHex(vector.aad));
    same(`aes_ctr_hmac ${vector.cipher_suite} pt`, p.hex(pt), vector.pt);
  }
  for (const vector of sframe.sframe) {
    const suite = vector.cipher_suite;
    const kid = BigInt(vector.kid);
    const { key, salt } = await s.deriveKeySalt(suite, kid, p.fromHex(vector.base_key));
    same(`sframe ${suite} key`, p.hex(key), vector.sframe_key);
    same(`sframe ${suite} salt`, p.hex(salt), vector.sframe_salt);
    const sender = new s.SendContext(suite);
    await sender.addKey(kid, p.fromHex(vector.base_key), BigInt(vector.ctr));
    const ct = await sender.protect(kid, p.fromHex(vector.pt), p.fromHex(vector.metadata));
    same(`sframe ${suite} ct`, p.hex(ct), vector.ct);
    const receiver = new s.ReceiveContext(suite);
    await receiver.addKey(kid, p.fromHex(vector.base_key));
    same(`sframe ${suite} pt`, p.hex(await receiver.unprotect(p.fromHex(vector.ct), p.fromHex(vector.metadata))), vector.pt);
    checked++;
    try {
      await receiver.unprotect(p.fromHex(vector.ct), p.fromHex(vector.metadata));
      mismatches.push(`sframe ${suite}: a replay was accepted`);
    } catch (error) {
      if (error.kind !== "ReplayError") mismatches.push(`sframe ${suite} replay: ${error.kind}`);
    }
  }
  return { checked, mismatches };
};
