// The page's audit of its own media, for two-party calls (call.js) and group calls (group.js)
// alike: every AUDIT_INTERVAL, what Chromium says it sent and decoded (getStats) against what
// the SFrame worker (worker.js) encrypted and passed on to each receiver's decoder. Media that
// went around the worker (sent in clear, or ciphertext and unauthenticated frames decoded)
// shows as more, and the call ends at once: fail closed even if a browser stops running a
// transform it was given.

const AUDIT_INTERVAL = 1_000;

const NOTHING_PASSED = { given: 0, passed: 0, samples: 0, longest: 0 };
// Video frames Chromium may have encoded and handed to the worker's stream that the worker has
// not taken yet when it answers: the stream holds one while the worker encrypts the one before.
const IN_FLIGHT = 1;

// Chromium's reports against the worker's counts: `given` ({audio, video}: frames the worker
// took to send), `sent` (those it encrypted), `dropped` (those it did not pass on), `sentBytes`
// (the bytes it encrypted) and `receivers` ({mid: {given, passed, samples, longest}}). Returns
// what went around the worker (a sentence, or null) and the counts compared, by kind sent and
// by mid received.
function compare(reports, { given: toSend, sent, dropped, sentBytes }, receivers) {
  const compared = { sent: {}, slots: {} };
  for (const report of reports.values()) {
    const video = report.kind === "video";
    let bypassed = null;
    if (report.type === "outbound-rtp") {
      // Chromium counts a video frame as sent once it is encoded, before the transform (and
      // the frames the worker drops for want of a key): it is compared with the frames the
      // worker took, counted as it takes each, before it encrypts or drops it, and at most
      // IN_FLIGHT more on their way to it. A frame sent around the worker is never given to it.
      // Audio is counted in payload bytes on the wire (an Opus frame is one packet's payload,
      // exactly as the worker encrypted it), not in packets: between two Chromium peers its
      // packet count runs ahead of the frames the worker encrypted (by one, in a test that
      // failed a third of its runs on packets), never its payload bytes.
      const left = video ? report.framesSent || 0 : (report.bytesSent || 0) - (report.retransmittedBytesSent || 0);
      const allowed = video ? toSend.video + IN_FLIGHT : sentBytes.audio;
      compared.sent[report.kind] = video
        ? { left, allowed, given: toSend.video, encrypted: sent.video, dropped: dropped.video }
        : { left, allowed, encrypted: sentBytes.audio };
      if (left > allowed) {
        const [unit, counted, how] = video ? ["frames", toSend.video, "given to"] : ["bytes", sentBytes.audio, "encrypted by"];
        bypassed = `sent ${left} ${report.kind} ${unit} from ${counted} ${unit} ${how} our worker: media left unencrypted`;
      }
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
    const { bypassed, sent, slots } = compare(reports, counted, this.receivers(counted.receivers));
    if (bypassed !== null) {
      this.stop();
      this.pc.close();
      this.bypassed(bypassed);
      return;
    }
    this.audited({ sent, slots });
  }
}
