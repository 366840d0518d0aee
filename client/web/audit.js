// The page's audit of its own media, for two-party calls (call.js) and group calls (group.js)
// alike: every AUDIT_INTERVAL, what Chromium says it sent and decoded (getStats) against what
// the SFrame worker (worker.js) encrypted and passed on to each receiver's decoder. Media that
// went around the worker (sent in clear, or ciphertext and unauthenticated frames decoded)
// shows as more, and the call ends at once: fail closed even if a browser stops running a
// transform it was given.

const AUDIT_INTERVAL = 1_000;

const NOTHING_PASSED = { given: 0, passed: 0, samples: 0, longest: 0 };

// Chromium's reports against the worker's counts: `sent` ({audio, video}: frames encrypted),
// `dropped` (frames the worker was given and did not pass on), `sentBytes` (the bytes of those
// encrypted) and `receivers` ({mid: {given, passed, samples, longest}}); `encodedBefore`: each
// video sender's frames as Chromium counted them at the audit before. Returns what went around
// the worker (a sentence, or null) and the counts compared, by kind sent and by mid received.
function compare(reports, { sent, dropped, sentBytes }, receivers, encodedBefore) {
  const compared = { sent: {}, slots: {} };
  for (const report of reports.values()) {
    const video = report.kind === "video";
    let bypassed = null;
    if (report.type === "outbound-rtp") {
      // Chromium counts a video frame as sent once it is encoded, before the transform: what
      // it counted at the audit before has had an interval to reach the worker (one still
      // queued for it, or being encrypted, when it answers now is not taken for a bypass), and
      // a frame the worker dropped (given before the page gave it a send key) counts although
      // nothing of it left. A frame that went around the worker was never given to it. Audio
      // is counted in payload bytes on the wire (an Opus frame is one packet's payload,
      // exactly as the worker encrypted it), not in packets: between two Chromium peers its
      // packet count runs ahead of the frames the worker encrypted (by one, in a test that
      // failed a third of its runs on packets), never its payload bytes.
      const left = video ? encodedBefore.get(report.id) || 0 : (report.bytesSent || 0) - (report.retransmittedBytesSent || 0);
      const encrypted = video ? sent.video : sentBytes.audio;
      const withheld = video ? dropped.video : 0;
      const unit = video ? "frames" : "bytes";
      compared.sent[report.kind] = { left, encrypted, withheld };
      if (left > encrypted + withheld) bypassed = `sent ${left} ${report.kind} ${unit} from ${encrypted} ${unit} our worker encrypted (and ${withheld} it dropped): media left unencrypted`;
    } else if (report.type === "inbound-rtp") {
      const { given, passed, samples, longest } = receivers[report.mid] || NOTHING_PASSED;
      const decoded = (video ? report.framesDecoded : report.jitterBufferEmittedCount) || 0;
      // Audio is counted in samples: those of the frames passed on (the worker reads each
      // one's length), and for every frame that did not come through us (lost on the way, or
      // not passed on) at most the longest of ours again, which in-band FEC may rebuild from
      // the frame after it. Ciphertext decoded as noise goes past this within an interval;
      // a bound per frame passed on would let it run for as long as the call had lasted.
      const missing = given - passed + Math.max(0, report.packetsLost || 0);
      const allowed = video ? passed : samples + missing * longest;
      compared.slots[report.mid] = { kind: report.kind, packets: report.packetsReceived, given, passed, decoded, allowed };
      if (decoded > allowed) bypassed = `decoded ${decoded} ${report.kind} ${video ? "frames" : "samples"} on slot ${report.mid} from ${passed} frames our worker decrypted: media reached a decoder without being decrypted`;
    }
    if (bypassed !== null) return { bypassed: `the browser ${bypassed}`, ...compared };
  }
  return { bypassed: null, ...compared };
}

// The audit of one connection whose transforms all run in `worker`, from start() until stop().
// The owner hands the worker's {type: "audit"} answers to answered(); `receivers(counted)` keys
// the worker's receiver counts by mid (a group's worker already does); `audited({sent, slots})`
// shows each audit's counts; on a bypass the connection is closed at once, the audit stops and
// `bypassed(message)` ends the call.
export class MediaAudit {
  constructor({ pc, worker, receivers = (counted) => counted, audited, bypassed }) {
    Object.assign(this, { pc, worker, receivers, audited, bypassed });
    this.timer = null;
    this.answer = null;
    this.stopped = false;
    this.encoded = new Map(); // each video sender's frames as Chromium counted them last
  }

  start() {
    this.timer = setTimeout(async () => {
      await this.check();
      if (!this.stopped) this.start();
    }, AUDIT_INTERVAL);
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
  }

  answered(counted) {
    if (this.answer) this.answer(counted);
  }

  async check() {
    let reports;
    try {
      reports = await this.pc.getStats();
    } catch {
      return; // the connection closed meanwhile: the call is ending
    }
    // Asked after the statistics were taken: the counts cover every frame sent or decoded by then.
    const counted = await new Promise((resolve) => {
      this.answer = resolve;
      this.worker.postMessage({ type: "audit" });
    });
    if (this.stopped) return;
    const { bypassed, sent, slots } = compare(reports, counted, this.receivers(counted.receivers), this.encoded);
    this.encoded = new Map();
    for (const report of reports.values()) {
      if (report.type === "outbound-rtp" && report.kind === "video") this.encoded.set(report.id, report.framesSent || 0);
    }
    if (bypassed !== null) {
      this.stop();
      this.pc.close();
      this.bypassed(bypassed);
      return;
    }
    this.audited({ sent, slots });
  }
}
