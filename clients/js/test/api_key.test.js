// Against a server that takes API keys (OPTSERVE_API_KEY: scripts/test-clients starts its server
// with one): calls with the key work, number for number against in-process torch
// (make_reference.py's seed run, on this machine); without a key, or with a wrong one, every call
// is the 401 problem (AuthenticationError, code "unauthorized", field "authorization"), sent once,
// and a refused step changes nothing.
import assert from "node:assert/strict";
import { after, describe, test } from "node:test";

import { AuthenticationError, Tensor } from "../optserve.js";
import { API_KEY, BASE_URL, NO_KEYED_SERVER, assertBits, client, reference, uid } from "./helpers.js";

/** SGD momentum on f(x) = 4x^2 (make_reference.py's seed_momentum): the gradient at x, 8x (exact). */
const gradAt = (x) => ({ x: new Tensor("float32", [1], Float32Array.of(8 * x.data[0])) });

describe("a server that takes API keys", { skip: NO_KEYED_SERVER }, () => {
  const c = client();
  const made = [];
  after(async () => {
    for (const id of made) await c.deleteSession(id).catch(() => {});
  });

  async function seedSession(prefix) {
    const seed = reference().seed_momentum;
    const id = uid(prefix);
    made.push(id);
    await c.createSession({ id, optimizer: seed.optimizer, options: seed.options, scheduler: seed.scheduler,
      params: { x: new Tensor("float32", [1], Float32Array.of(seed.x0)) } });
    return { id, seed };
  }

  test("calls with the key: answered as torch computes them, JSON and safetensors", async () => {
    assert.equal((await c.ready()).status, "ready"); // (/readyz takes the key too)
    const { id, seed } = await seedSession("keyed");
    let x = new Tensor("float32", [1], Float32Array.of(seed.x0));
    for (let i = 0; i < seed.steps.length; i++) {
      const out = await c.step(id, gradAt(x), { binary: i % 2 === 1 });
      x = out.params.x;
      assertBits(x, seed.steps[i].x, `x after step ${i + 1}`);
      assert.deepEqual(out.lr, [seed.steps[i].lr]);
      assert.equal(out.version, i + 1);
    }
    const pulled = await c.getParams(id, { binary: true });
    assertBits(pulled.params.x, seed.steps.at(-1).x, "pulled x");
    const state = await c.exportState(id);
    assert.equal(state.param_groups[0].lr, seed.steps.at(-1).lr);
    assert.ok((await c.listSessions()).some((s) => s.id === id), "the key's tenant lists the session");
  });

  for (const [name, apiKey, detail] of [
    ["no key", undefined, "missing Authorization: Bearer <key>"],
    ["a wrong key", `${API_KEY}-not`, "the API key is not valid"],
  ]) {
    test(`${name}: the 401 problem on every call, sent once, nothing done`, async () => {
      const { id, seed } = await seedSession("unkeyed");
      const first = await c.step(id, gradAt(new Tensor("float32", [1], Float32Array.of(seed.x0))));
      assertBits(first.params.x, seed.steps[0].x, "x after step 1");
      let sent = 0;
      const other = client({ apiKey, fetch: (url, init) => { sent += 1; return fetch(url, init); } });
      const calls = {
        step: () => other.step(id, gradAt(first.params.x)),
        getSession: () => other.getSession(id),
        getParams: () => other.getParams(id),
        listSessions: () => other.listSessions(),
        ready: () => other.ready(),
        deleteSession: () => other.deleteSession(id),
      };
      for (const [call, run] of Object.entries(calls)) {
        const before = sent;
        const err = await run().then(() => assert.fail(`${call} was answered`), (e) => e);
        assert.ok(err instanceof AuthenticationError, `${call}: ${err}`);
        assert.equal(err.status, 401, call);
        assert.equal(err.code, "unauthorized", call);
        assert.equal(err.field, "authorization", call);
        assert.equal(err.detail, detail, call);
        assert.equal(err.problem.type, "urn:optserve:problem:unauthorized", call);
        assert.equal(err.problem.status, 401, call);
        assert.equal(sent - before, 1, `${call}: a 401 is not retried`);
      }
      assert.equal((await other.health()).status, "ok"); // (/healthz needs no key)
      // nothing was done: the session is where the keyed step left it, and goes on as torch does
      const desc = await c.getSession(id);
      assert.equal(desc.version, 1);
      assert.equal(desc.step, 1);
      const second = await c.step(id, gradAt(first.params.x));
      assertBits(second.params.x, seed.steps[1].x, "x after step 2");
      assert.equal(second.version, 2);
    });
  }

  test("raw HTTP: the 401 is problem+json with WWW-Authenticate", async () => {
    const res = await fetch(`${BASE_URL}/v1/sessions`, { headers: { Authorization: "Bearer nope" } });
    assert.equal(res.status, 401);
    assert.match(res.headers.get("content-type"), /^application\/problem\+json/);
    assert.equal(res.headers.get("www-authenticate"), 'Bearer realm="optserve"');
    const problem = await res.json();
    assert.equal(problem.code, "unauthorized");
    assert.equal(problem.detail, "the API key is not valid");
    const ok = await fetch(`${BASE_URL}/v1/sessions`, { headers: { Authorization: `Bearer ${API_KEY}` } });
    assert.equal(ok.status, 200);
    assert.ok(Array.isArray((await ok.json()).sessions));
  });
});
