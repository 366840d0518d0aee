// Run in the served page by tests/test_web_vectors.py (page.evaluate): tests/vectors/group/
// through client/web/senderkeys.js, sframe.js and protocol.js, byte for byte. Returns
// {checked, mismatches}.
async (vectors) => {
  const p = await import("/protocol.js");
  const s = await import("/sframe.js");
  const g = await import("/senderkeys.js");
  const mismatches = [];
  let checked = 0;
  const same = (what, actual, expected) => {
    checked++;
    if (actual !== expected) mismatches.push(`${what}: got ${actual}, expected ${expected}`);
  };

  same("ratchet bits", g.RATCHET_BITS, vectors.ratchet_bits);
  for (const { generation, step, kid } of vectors.kids) same(`kid ${generation}/${step}`, g.senderKeyKid(generation, step), kid);

  for (const { cipher_suite: suite, generation, steps } of vectors.ratchet) {
    let key = new g.SenderKey(suite, generation, 0, p.fromHex(steps[0].base_key));
    for (const expected of steps) {
      same(`suite ${suite} step ${expected.step}`, key.step, expected.step);
      same(`suite ${suite} step ${expected.step} kid`, key.kid, expected.kid);
      same(`suite ${suite} step ${expected.step} base key`, p.hex(key.baseKey), expected.base_key);
      const { key: sframeKey, salt } = await s.deriveKeySalt(suite, BigInt(key.kid), key.baseKey);
      same(`suite ${suite} step ${expected.step} sframe key`, p.hex(sframeKey), expected.sframe_key);
      same(`suite ${suite} step ${expected.step} sframe salt`, p.hex(salt), expected.sframe_salt);
      key = await key.ratcheted();
    }
  }

  // The frame under a ratcheted key: sent, and received by a receiver that holds an earlier
  // step of the generation (it follows the ratchet), and by one that holds none (it holds the
  // frame and releases it with the key).
  const frame = vectors.frame;
  const key = new g.SenderKey(frame.cipher_suite, frame.generation, frame.step, p.fromHex(frame.base_key));
  same("frame kid", key.kid, frame.kid);
  const sender = new s.SendContext(frame.cipher_suite);
  await sender.addKey(BigInt(key.kid), key.baseKey, BigInt(frame.ctr));
  same("frame ciphertext", p.hex(await sender.protect(BigInt(key.kid), p.fromHex(frame.plaintext), p.fromHex(frame.metadata))), frame.ciphertext);
  const kind = new TextDecoder().decode(p.fromHex(frame.metadata));
  const behind = vectors.ratchet.find((r) => r.cipher_suite === frame.cipher_suite);
  const early = new g.SenderKeyReceiver(frame.cipher_suite);
  await early.addKey(new g.SenderKey(frame.cipher_suite, frame.generation, 0, p.fromHex(behind.steps[0].base_key)));
  const followed = await early.unprotect(kind, p.fromHex(frame.ciphertext));
  same("followed the ratchet", followed && p.hex(followed), frame.plaintext);
  same("a replay fails", await early.unprotect(kind, p.fromHex(frame.ciphertext)), null);
  same("the replay is counted", early.counters()[kind].reasons.ReplayError, 1);
  const late = new g.SenderKeyReceiver(frame.cipher_suite);
  same("held", await late.unprotect(kind, p.fromHex(frame.ciphertext), "tag"), null);
  const released = await late.addKey(key);
  same("released", released.length === 1 && `${released[0].kind} ${p.hex(released[0].plaintext)} ${released[0].tag}`, `${kind} ${frame.plaintext} tag`);
  const joiner = new g.SenderKeyReceiver(frame.cipher_suite);
  await joiner.addKey(await key.ratcheted());
  same("before join", await joiner.unprotect(kind, p.fromHex(frame.ciphertext)), null);
  same("counted as before join", `${joiner.counters()[kind].beforeJoin} ${joiner.counters()[kind].failed}`, "1 0");

  // The sealed plaintexts.
  same("sender-key plaintext", p.canonicalJson(p.senderKeyInner(key)), vectors.sender_key_message["sender-key"]);
  same("sender-key-ack plaintext", p.canonicalJson(p.senderKeyAckInner(key.kid)), vectors.sender_key_message["sender-key-ack"]);
  const parsed = p.parseInner(p.strictParse(vectors.sender_key_message["sender-key"]));
  same("parsed sender key", `${parsed.suite} ${parsed.generation} ${parsed.step} ${p.hex(parsed.baseKey)}`, `${frame.cipher_suite} ${frame.generation} ${frame.step} ${frame.base_key}`);
  same("parsed ack", p.parseInner(p.strictParse(vectors.sender_key_message["sender-key-ack"])).kid, frame.kid);

  const members = vectors.security_code.members.map((m) => ({ identity: p.fromHex(m.identity_key), generation: m.generation }));
  same("security code", await g.groupSecurityCode(members), vectors.security_code.code);
  same("security code, any order", await g.groupSecurityCode([...members].reverse()), vectors.security_code.code);
  return { checked, mismatches };
};
