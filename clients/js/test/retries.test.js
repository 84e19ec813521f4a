// Retry timing without a server and without waiting: the sleep and the random source are injected.
import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { ConnectionError, OptserveClient } from "../optserve.js";

/** A fetch that never gets an answer (what Node's fetch throws when the connection is refused). */
function refusing(calls) {
  return async (url, init) => {
    calls.push({ url, init });
    throw new TypeError("fetch failed", { cause: Object.assign(new Error("refused"), { code: "ECONNREFUSED", syscall: "connect" }) });
  };
}

/** A sleep that records the delays it was asked for and returns at once. */
function recorder(delays) {
  return async (ms) => {
    delays.push(ms);
  };
}

describe("retry delays", () => {
  test("exponential, capped at 8 s, each scaled by a random factor in [0.75, 1] (as the Python SDK)", async () => {
    const delays = [];
    const calls = [];
    const draws = [0, 1, 0.5, 0.25, 0.999, 0.1, 0.7, 0.3];
    let n = 0;
    const c = new OptserveClient({
      baseUrl: "http://optserve.invalid", fetch: refusing(calls), maxRetries: draws.length, retryDelayMs: 500,
      sleep: recorder(delays), random: () => draws[n++],
    });
    const err = await c.health().catch((e) => e);
    assert.ok(err instanceof ConnectionError, String(err));
    assert.equal(calls.length, draws.length + 1);
    assert.equal(delays.length, draws.length);
    draws.forEach((r, attempt) => {
      const full = Math.min(500 * 2 ** attempt, 8000);
      assert.equal(delays[attempt], full * (1 - 0.25 * r), `retry ${attempt + 1}`);
    });
  });

  test("with the default random source, workers' delays spread within the bounds", async () => {
    const firsts = [];
    for (let worker = 0; worker < 64; worker++) {
      const delays = [];
      const c = new OptserveClient({ baseUrl: "http://optserve.invalid", fetch: refusing([]), maxRetries: 3, sleep: recorder(delays) });
      await c.health().catch(() => {});
      assert.equal(delays.length, 3);
      delays.forEach((d, attempt) => {
        const full = 500 * 2 ** attempt;
        assert.ok(d >= 0.75 * full && d <= full, `worker ${worker}, retry ${attempt + 1}: ${d} ms outside [${0.75 * full}, ${full}]`);
      });
      firsts.push(delays[0]);
    }
    // 64 draws from [375, 500]: all equal would mean no spread at all
    assert.ok(new Set(firsts).size > 1, `every worker waits ${firsts[0]} ms before its first retry`);
  });
});
