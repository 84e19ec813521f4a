// problem+json answers become typed errors; a rejected request leaves the session unchanged.
import assert from "node:assert/strict";
import { createServer } from "node:net";
import { after, describe, test } from "node:test";

import {
  BadRequestError, ConflictError, ConnectionError, NotFoundError, OptserveClient, OptserveError,
  PayloadTooLargeError, Tensor, ValidationError,
} from "../optserve.js";
import { NO_SERVER, assertSameTensor, client, uid } from "./helpers.js";

describe("errors", { skip: NO_SERVER }, () => {
  const c = client();
  const made = [];
  after(async () => {
    for (const id of made) await c.deleteSession(id).catch(() => {});
  });
  const fresh = async () => {
    const id = uid("err");
    made.push(id);
    await c.createSession({ id, optimizer: "SGD", options: { lr: 0.1 }, params: { w: Tensor.from([1, 2]) } });
    return id;
  };

  test("404 for an unknown session", async () => {
    const err = await c.getSession(uid("missing")).catch((e) => e);
    assert.ok(err instanceof NotFoundError);
    assert.ok(err instanceof OptserveError);
    assert.equal(err.status, 404);
    assert.match(err.code, /not_found$/);
    assert.equal(err.problem.type, `urn:optserve:problem:${err.code}`);
    assert.equal(err.problem.status, 404);
    await assert.rejects(c.step(uid("missing"), { w: Tensor.from([1]) }), NotFoundError);
    await assert.rejects(c.deleteSession(uid("missing")), NotFoundError);
  });

  test("422 with the offending field; the session is unchanged", async () => {
    const id = await fresh();
    const cases = [
      [{ w: Tensor.from([1, 2, 3]) }, "grads.w"], // wrong shape
      [{ w: Tensor.from([1, 2], { dtype: "float64" }) }, "grads.w"], // no silent casts
      [{ nope: Tensor.from([1, 2]) }, "grads.nope"], // unknown parameter
      [{ w: Tensor.from([NaN, 1]) }, "grads.w"], // non-finite (policy: reject)
    ];
    for (const [grads, field] of cases) {
      const err = await c.step(id, grads).catch((e) => e);
      assert.ok(err instanceof ValidationError, `${field}: ${err}`);
      assert.equal(err.status, 422);
      assert.equal(err.field, field);
      assert.equal(typeof err.detail, "string");
      assert.ok(err.detail.length > 0);
    }
    const binErr = await c.step(id, { w: Tensor.from([1, 2, 3]) }, { binary: true }).catch((e) => e);
    assert.ok(binErr instanceof ValidationError);
    const opt = await c.createSession({ optimizer: "SGD", options: { lr: -1 }, params: { w: Tensor.from([1]) } }).catch((e) => e);
    assert.ok(opt instanceof ValidationError);
    assert.equal(opt.field, "options.lr");
    const unknown = await c.createSession({ optimizer: "NoSuchOpt", params: { w: Tensor.from([1]) } }).catch((e) => e);
    assert.ok(unknown instanceof ValidationError);
    assert.equal(unknown.field, "optimizer");
    const desc = await c.getSession(id);
    assert.equal(desc.version, 0);
    assert.equal(desc.step, 0);
    assertSameTensor((await c.getParams(id)).params.w, Tensor.from([1, 2]));
  });

  test("409 when the id is taken", async () => {
    const id = await fresh();
    const err = await c.createSession({ id, optimizer: "Adam", params: { v: Tensor.from([0]) } }).catch((e) => e);
    assert.ok(err instanceof ConflictError);
    assert.equal(err.status, 409);
    assert.equal((await c.getSession(id)).optimizer, "SGD");
  });

  test("400 for a body that is not JSON; 415 and 406 as OptserveError", async () => {
    const id = await fresh();
    const bad = await c.request("POST", `/v1/sessions/${id}/step`, { body: "{not json", contentType: "application/json" }).catch((e) => e);
    assert.ok(bad instanceof BadRequestError);
    assert.equal(bad.status, 400);
    const notSt = await c.request("POST", `/v1/sessions/${id}/step`, { body: new Uint8Array(3) }).catch((e) => e);
    assert.ok(notSt instanceof BadRequestError);
    const media = await c.request("POST", `/v1/sessions/${id}/step`, { body: "x", contentType: "text/plain" }).catch((e) => e);
    assert.equal(media.constructor, OptserveError);
    assert.equal(media.status, 415);
    const accept = await c.request("GET", `/v1/sessions/${id}/params`, { accept: "text/csv" }).catch((e) => e);
    assert.equal(accept.status, 406);
    assert.equal(accept.field, "accept");
  });

  test("413 above OPTSERVE_MAX_BODY_MB", { skip: !process.env.OPTSERVE_TEST_MAX_BODY_MB && "OPTSERVE_TEST_MAX_BODY_MB not set" }, async () => {
    const id = await fresh();
    const n = Math.ceil((Number(process.env.OPTSERVE_TEST_MAX_BODY_MB) * 1024 * 1024) / 4) + 1024;
    const err = await c.step(id, { w: new Tensor("float32", [n], new Float32Array(n)) }, { binary: true }).catch((e) => e);
    assert.ok(err instanceof PayloadTooLargeError, String(err));
    assert.equal(err.status, 413);
  });
});

// needs no optserve: a port nobody listens on
describe("no server", () => {
  /** A loopback port that was just free (bound, then closed again). */
  async function closedPort() {
    const srv = createServer();
    await new Promise((resolve) => srv.listen(0, "127.0.0.1", resolve));
    const { port } = srv.address();
    await new Promise((resolve) => srv.close(resolve));
    return port;
  }

  test("ConnectionError naming the URL, the reason and the likely cause", async () => {
    const port = await closedPort();
    const baseUrl = `http://127.0.0.1:${port}`;
    const dead = new OptserveClient({ baseUrl, timeoutMs: 5000, maxRetries: 0 });
    const err = await dead.createSession({ optimizer: "SGD", options: { lr: 1 }, params: { x: Tensor.from([2]) } }).catch((e) => e);
    assert.ok(err instanceof ConnectionError, String(err));
    assert.ok(err instanceof OptserveError);
    assert.equal(err.name, "ConnectionError");
    assert.equal(err.status, 0);
    assert.equal(err.code, "connection_error");
    assert.equal(err.message, `cannot reach optserve at ${baseUrl}/v1/sessions: connect ECONNREFUSED (is the server running?)`);
    assert.equal(err.detail, err.message);
    assert.ok(err.cause instanceof Error, "the fetch error is kept as the cause");

    const health = await dead.health().catch((e) => e);
    assert.ok(health instanceof ConnectionError, String(health));
    assert.equal(health.message, `cannot reach optserve at ${baseUrl}/healthz: connect ECONNREFUSED (is the server running?)`);
  });

  test("a port fetch refuses (9, discard) says so, at once: not retried", async () => {
    let calls = 0;
    const counted = (...args) => { calls += 1; return fetch(...args); };
    const err = await new OptserveClient({ baseUrl: "http://127.0.0.1:9", fetch: counted }).health().catch((e) => e);
    assert.equal(calls, 1, "a refused port is the same at every retry: one call, not a minute of retries");
    assert.ok(err instanceof ConnectionError, String(err));
    assert.equal(err.code, "connection_error");
    assert.equal(err.message, "cannot reach optserve at http://127.0.0.1:9/healthz: bad port (fetch refuses this port; run the server on another)");
  });
});
