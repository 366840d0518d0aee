// The order in which a call (call.js) or a group call (group.js) does things: its events run
// one at a time, in arrival order, because every step awaits WebCrypto and the next must see
// what the one before did; its timers' actions join that order; and ending stops them all.

export class SerialSteps {
  // `stopped()`: whether the owner has ended (no step runs after); `failed(error)`: what a
  // step that throws becomes.
  constructor({ stopped, failed }) {
    Object.assign(this, { stopped, failed });
    this.queue = Promise.resolve();
    this.timers = new Set();
  }

  run(step) {
    this.queue = this.queue.then(async () => {
      if (this.stopped()) return;
      try {
        await step();
      } catch (error) {
        await this.failed(error);
      }
    });
    return this.queue;
  }

  // `action` runs as a step `ms` from now, unless cancelled or stopped first.
  after(ms, action) {
    const timer = setTimeout(() => {
      this.timers.delete(timer);
      this.run(action);
    }, ms);
    this.timers.add(timer);
    return timer;
  }

  cancel(timer) {
    if (timer === null || timer === undefined) return;
    clearTimeout(timer);
    this.timers.delete(timer);
  }

  stop() {
    for (const timer of this.timers) clearTimeout(timer);
    this.timers.clear();
  }
}
