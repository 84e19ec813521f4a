// The default retry budget (no maxRetries): a failed call is retried while 60 s have not passed
// since its first failure, its waits capped at 4 s, so a server restart of a few seconds is
// waited out; a maxRetries count works as before. Also: a baseUrl without a scheme is refused
// at construction. No server: the fetch, the sleep and the clock are injected.
import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { ConnectionError, OptserveClient } from "../optserve.js";

/** A fake clock advanced by the client's waits, and a fetch refused until `untilMs` passed. */
function world(untilMs = Infinity) {
  const w = { t: 0, waits: [], calls: 0 };
  w.now = () => w.t;
  w.sleep = async (ms) => {
    w.waits.push(ms);
    w.t += ms;
  };
  w.fetch = async () => {
    w.calls++;
    if (w.t >= untilMs) return new Response(JSON.stringify({ status: "ok" }), { headers: { "Content-Type": "application/json" } });
    throw new TypeError("fetch failed", { cause: Object.assign(new Error("refused"), { code: "ECONNREFUSED", syscall: "connect" }) });
  };
  return w;
}

const sum = (xs) => xs.reduce((a, b) => a + b, 0);

describe("retry budget", () => {
  test("a default client waits out a 15 s restart", async () => {
    const w = world(15000);
    const c = new OptserveClient({ baseUrl: "http://optserve.invalid", fetch: w.fetch, sleep: w.sleep, now: w.now });
    assert.deepEqual(await c.health(), { status: "ok" });
    assert.ok(sum(w.waits) >= 15000 && sum(w.waits) < 15000 + 4000, String(w.waits));
  });

  test("a default client gives up once 60 s have passed since the first failure", async () => {
    const w = world();
    const c = new OptserveClient({ baseUrl: "http://optserve.invalid", fetch: w.fetch, sleep: w.sleep, now: w.now });
    const err = await c.health().catch((e) => e);
    assert.ok(err instanceof ConnectionError, String(err));
    assert.ok(sum(w.waits.slice(0, -1)) < 60000 && sum(w.waits) >= 60000, String(w.waits));
    assert.equal(w.calls, w.waits.length + 1);
    assert.ok(Math.max(...w.waits) <= 4000);
  });

  test("maxRetries counts without a bound in time; with retryBudgetMs, both bound", async () => {
    const w = world();
    const c = new OptserveClient({ baseUrl: "http://optserve.invalid", fetch: w.fetch, sleep: w.sleep, now: w.now, maxRetries: 30 });
    assert.ok((await c.health().catch((e) => e)) instanceof ConnectionError);
    assert.equal(w.calls, 31);
    assert.ok(sum(w.waits) > 60000);
    const v = world();
    const both = new OptserveClient({ baseUrl: "http://optserve.invalid", fetch: v.fetch, sleep: v.sleep, now: v.now, maxRetries: 30, retryBudgetMs: 5000 });
    assert.ok((await both.health().catch((e) => e)) instanceof ConnectionError);
    assert.ok(v.calls < 31 && sum(v.waits.slice(0, -1)) < 5000 && sum(v.waits) >= 5000);
  });

  test("bad maxRetries or retryBudgetMs are refused", () => {
    assert.throws(() => new OptserveClient({ maxRetries: -1 }), /maxRetries/);
    assert.throws(() => new OptserveClient({ retryBudgetMs: Infinity }), /retryBudgetMs/);
  });
});

describe("baseUrl", () => {
  for (const bad of ["127.0.0.1:8000", "localhost:8000", "ftp://x", "optserve"]) {
    test(`${bad} is refused at construction, named`, () => {
      assert.throws(() => new OptserveClient({ baseUrl: bad }), (e) => e instanceof RangeError && e.message.includes(JSON.stringify(bad)));
    });
  }
  test("http(s) URLs are taken, trailing slashes dropped", () => {
    assert.equal(new OptserveClient({ baseUrl: "http://127.0.0.1:8000/" }).baseUrl, "http://127.0.0.1:8000");
    assert.equal(new OptserveClient({ baseUrl: "https://h.example/prefix" }).baseUrl, "https://h.example/prefix");
  });
});
