// Exactly once under retries, against a real server: every mutating call carries a fresh
// Idempotency-Key kept for its retries; an answer lost after the server applied the step is
// retried and answered ("replayed"), not applied again. Expected values: seed x0 = 2, SGD lr 1,
// gradient 8x, so one step gives x1 = -14 (two would give 98), exact in float32.
import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { ConflictError, ConnectionError, OptserveClient, Tensor, UnavailableError, ValidationError } from "../optserve.js";
import { API_KEY, BASE_URL, NO_SERVER, uid } from "./helpers.js";

/** A fetch that performs the request for real, then loses the first `drops` answers of `path`. */
function droppingFetch(pathPart, drops = 1) {
  const sent = [];
  const fetchImpl = async (url, init) => {
    sent.push({ url, headers: { ...init.headers } });
    const res = await globalThis.fetch(url, init);
    if (String(url).includes(pathPart) && drops > 0) {
      drops -= 1;
      await res.arrayBuffer(); // the server answered, the client never sees it
      throw new TypeError("fetch failed", { cause: Object.assign(new Error("other side closed"), { code: "UND_ERR_SOCKET" }) });
    }
    return res;
  };
  return { fetchImpl, sent };
}

describe("exactly once", { skip: NO_SERVER }, () => {
  test("a step whose answer was lost is retried with its key and applied once", async () => {
    const { fetchImpl, sent } = droppingFetch("/step");
    const c = new OptserveClient({ baseUrl: BASE_URL, apiKey: API_KEY, fetch: fetchImpl, retryDelayMs: 1 });
    const id = uid("once");
    await c.createSession({ id, optimizer: "SGD", options: { lr: 1 }, params: { x: Tensor.from([2]) } });
    const out = await c.step(id, { x: Tensor.from([16]) });
    assert.equal(out.version, 1);
    assert.equal(out.replayed, true);
    assert.deepEqual(Array.from(out.params.x.data), [-14]);
    const steps = sent.filter((r) => r.url.includes("/step"));
    assert.equal(steps.length, 2);
    assert.equal(steps[0].headers["Idempotency-Key"], steps[1].headers["Idempotency-Key"]);
    assert.match(steps[0].headers["Idempotency-Key"], /^[0-9a-f]{32}$/);
    // and a later step is a new one: 98
    const next = await c.step(id, { x: Tensor.from([-112]) });
    assert.deepEqual([next.version, next.replayed], [2, undefined]);
    assert.deepEqual(Array.from(next.params.x.data), [98]);
    await c.deleteSession(id);
  });

  test("a step whose every retry failed is sent again later with the key its error carries", async () => {
    // the server applies the step, then goes away (a restart): the answer and every retry of
    // the client are lost; once it is back, the caller sends the step again with the same key
    let down = false;
    let lose = 1; // answers of /step to lose
    const sent = [];
    const fetchImpl = async (url, init) => {
      if (String(url).includes("/step")) sent.push(init.headers["Idempotency-Key"]);
      if (down) throw new TypeError("fetch failed", { cause: Object.assign(new Error("connect ECONNREFUSED"), { code: "ECONNREFUSED", syscall: "connect" }) });
      const res = await globalThis.fetch(url, init);
      if (String(url).includes("/step") && lose > 0) {
        lose -= 1;
        await res.arrayBuffer();
        down = true;
        throw new TypeError("fetch failed", { cause: Object.assign(new Error("other side closed"), { code: "UND_ERR_SOCKET" }) });
      }
      return res;
    };
    const c = new OptserveClient({ baseUrl: BASE_URL, apiKey: API_KEY, fetch: fetchImpl, retryDelayMs: 1, maxRetries: 1 });
    const id = uid("once-later");
    await c.createSession({ id, optimizer: "SGD", options: { lr: 1 }, params: { x: Tensor.from([2]) } });
    const grads = { x: Tensor.from([16]) };
    const err = await c.step(id, grads).catch((e) => e);
    assert.ok(err instanceof ConnectionError, String(err));
    assert.equal(sent.length, 2);
    assert.equal(err.idempotencyKey, sent[0], "the error names the key the step went out with");
    down = false; // the server is back
    const out = await c.step(id, grads, { idempotencyKey: err.idempotencyKey });
    assert.deepEqual([out.version, out.replayed], [1, true]);
    assert.deepEqual(Array.from(out.params.x.data), [-14]); // applied once (twice: 98)
    assert.equal(sent.at(-1), sent[0]);
    // the other mutating calls take a key too: a repeat of a push is not accumulated twice
    const push = { x: Tensor.from([1]) };
    await c.pushGrads(id, push, { idempotencyKey: "push-once-1" });
    const again = await c.pushGrads(id, push, { idempotencyKey: "push-once-1" });
    assert.equal(again.replayed, true);
    const stepped = await c.step(id, {});
    assert.deepEqual(Array.from(stepped.params.x.data), [-15]);
    await c.deleteSession(id, { idempotencyKey: "delete-once-1" });
    await c.deleteSession(id, { idempotencyKey: "delete-once-1" }); // answered 204, not 404
  });

  test("a key reused for another request is a 422, GETs carry no key", async () => {
    const { fetchImpl, sent } = droppingFetch("/never", 0);
    const c = new OptserveClient({ baseUrl: BASE_URL, apiKey: API_KEY, fetch: fetchImpl });
    const id = uid("reuse");
    await c.createSession({ id, optimizer: "SGD", options: { lr: 1 }, params: { x: Tensor.from([2]) } });
    const headers = { "Idempotency-Key": "k-reused-1" };
    await c.request("POST", `/v1/sessions/${id}/grads`, { json: { grads: { x: { dtype: "float32", shape: [1], data: [1] } } }, headers });
    await assert.rejects(
      c.request("POST", `/v1/sessions/${id}/grads`, { json: { grads: { x: { dtype: "float32", shape: [1], data: [2] } } }, headers }),
      (err) => err instanceof ValidationError && err.code === "idempotency_key_reused",
    );
    await c.getSession(id);
    assert.equal(sent.at(-1).headers["Idempotency-Key"], undefined);
    await c.deleteSession(id);
  });

  test("errors of the new statuses are typed", () => {
    assert.ok(new UnavailableError("x", { status: 503 }) instanceof Error);
    assert.ok(!(new UnavailableError("x") instanceof ConflictError));
  });
});

describe("options ride with the step", { skip: NO_SERVER }, () => {
  for (const binary of [false, true]) {
    test(`lr changed inside the step request (${binary ? "safetensors" : "JSON"})`, async () => {
      // x0 = 2, gradient 16; with lr 0.5 set in the same request: x1 = 2 - 0.5 * 16 = -6
      const c = new OptserveClient({ baseUrl: BASE_URL, apiKey: API_KEY });
      const id = uid("opts");
      await c.createSession({ id, optimizer: "SGD", options: { lr: 1 }, params: { x: Tensor.from([2]) } });
      const out = await c.step(id, { x: Tensor.from([16]) }, { binary, paramGroups: { 0: { lr: 0.5 } } });
      assert.deepEqual([out.version, out.lr], [1, [0.5]]);
      assert.deepEqual(Array.from(out.params.x.data), [-6]);
      // a refused option fails the whole step: nothing changes
      await assert.rejects(
        c.step(id, { x: Tensor.from([1]) }, { binary, paramGroups: [{ lr: -1 }] }),
        (err) => err instanceof ValidationError && err.field === "param_groups.0.lr",
      );
      const info = await c.getSession(id);
      assert.deepEqual([info.version, info.lr], [1, [0.5]]);
      await c.deleteSession(id);
    });
  }
});
