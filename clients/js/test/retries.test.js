// Retry timing without a server and without waiting: the sleep and the random source are injected.
import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { ConnectionError, OptserveClient, UnavailableError } from "../optserve.js";

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
  test("exponential, capped at 4 s, each scaled by a random factor in [0.75, 1] (as the Python SDK)", async () => {
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
      const full = Math.min(500 * 2 ** attempt, 4000);
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

/** A fetch that answers 503 with `Retry-After: seconds` for each of `afters`, then 200. */
function unavailableThenOk(calls, ...afters) {
  return async (url, init) => {
    calls.push({ url, init });
    const after = afters[calls.length - 1];
    if (after === undefined) return new Response('{"status":"ok"}', { status: 200, headers: { "Content-Type": "application/json" } });
    return new Response(JSON.stringify({ status: 503, code: "session_damaged", detail: "later" }), {
      status: 503, headers: { "Content-Type": "application/problem+json", "Retry-After": String(after) },
    });
  };
}

describe("Retry-After", () => {
  test("a 503's Retry-After past the 8 s backoff cap is waited in full (up to maxRetryAfterMs, default 60 s)", async () => {
    for (const after of [30, 60]) {
      const delays = [];
      const calls = [];
      const c = new OptserveClient({ baseUrl: "http://optserve.invalid", fetch: unavailableThenOk(calls, after), sleep: recorder(delays) });
      assert.deepEqual(await c.health(), { status: "ok" });
      assert.equal(calls.length, 2);
      assert.deepEqual(delays, [after * 1000]);
    }
  });

  test("a Retry-After past maxRetryAfterMs is thrown at once, with its retryAfter", async () => {
    const cases = [[61, undefined], [30, 10000], [10.5, 10000]];
    for (const [after, maxRetryAfterMs] of cases) {
      const delays = [];
      const calls = [];
      const c = new OptserveClient({
        baseUrl: "http://optserve.invalid", fetch: unavailableThenOk(calls, after), sleep: recorder(delays), maxRetryAfterMs,
      });
      const err = await c.health().catch((e) => e);
      assert.ok(err instanceof UnavailableError, String(err));
      assert.equal(err.retryAfter, after);
      assert.equal(calls.length, 1, `Retry-After ${after}, maxRetryAfterMs ${maxRetryAfterMs}: not retried`);
      assert.deepEqual(delays, []);
    }
    const delays = [];
    const c = new OptserveClient({ baseUrl: "http://optserve.invalid", fetch: unavailableThenOk([], 10), sleep: recorder(delays), maxRetryAfterMs: 10000 });
    await c.health();
    assert.deepEqual(delays, [10000]);
  });

  test("session_damaged without Retry-After (nothing restores it) is thrown at once; with one it is retried", async () => {
    const calls = [];
    const delays = [];
    const gone = async (url, init) => {
      calls.push({ url, init });
      if (calls.length > 1) return new Response('{"status":"ok"}', { status: 200, headers: { "Content-Type": "application/json" } });
      return new Response(JSON.stringify({ status: 503, code: "session_damaged", detail: "delete it" }), {
        status: 503, headers: { "Content-Type": "application/problem+json" },
      });
    };
    const c = new OptserveClient({ baseUrl: "http://optserve.invalid", fetch: gone, sleep: recorder(delays) });
    const err = await c.health().catch((e) => e);
    assert.ok(err instanceof UnavailableError, String(err));
    assert.equal(err.code, "session_damaged");
    assert.equal(calls.length, 1);
    assert.deepEqual(delays, []);
    const healing = new OptserveClient({ baseUrl: "http://optserve.invalid", fetch: unavailableThenOk([], 3), sleep: recorder(delays) });
    assert.deepEqual(await healing.health(), { status: "ok" });
    assert.deepEqual(delays, [3000]);
  });

  test("a short Retry-After still waits at least the backoff", async () => {
    const delays = [];
    const c = new OptserveClient({ baseUrl: "http://optserve.invalid", fetch: unavailableThenOk([], 0), sleep: recorder(delays), random: () => 0 });
    await c.health();
    assert.deepEqual(delays, [500]);
  });
});
