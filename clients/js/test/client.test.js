// Client behaviour against a stub HTTP server (no optserve needed): headers, timeouts, error mapping.
import assert from "node:assert/strict";
import { createServer } from "node:http";
import { after, before, describe, test } from "node:test";

import {
  AuthenticationError, BadRequestError, ConflictError, ConnectionError, NotFoundError, OptserveClient, OptserveError,
  PayloadTooLargeError, PermissionDeniedError, PreconditionFailedError, RateLimitError, StorageFullError, Tensor, UnavailableError,
  ValidationError, readSafetensors,
} from "../optserve.js";

describe("client against a stub server", () => {
  let server;
  let baseUrl;
  const seen = [];
  before(async () => {
    server = createServer((req, res) => {
      const chunks = [];
      req.on("data", (c) => chunks.push(c));
      req.on("end", () => {
        seen.push({ method: req.method, url: req.url, headers: req.headers, body: Buffer.concat(chunks) });
        const m = req.url.match(/^\/status\/(\d+)/);
        if (req.url.startsWith("/hang")) return; // never answers
        if (req.url.startsWith("/cut")) {
          // promises 100 bytes, sends 10, hangs up
          res.writeHead(200, { "Content-Type": "application/json", "Content-Length": "100" });
          res.write('{"version"', () => setTimeout(() => res.socket.destroy(), 20));
          return;
        }
        if (m) {
          const status = Number(m[1]);
          const after = req.url.match(/[?&]after=(\d+)/);
          res.writeHead(status, { "Content-Type": "application/problem+json", ...(after ? { "Retry-After": after[1] } : {}) });
          res.end(JSON.stringify({ type: "urn:optserve:problem:x", title: "T", status, detail: "went wrong", code: "x", field: "a.b" }));
          return;
        }
        if (req.url.startsWith("/v1/sessions/inf")) { // a description with a non-finite lr
          res.writeHead(200, { "Content-Type": "application/json" });
          res.end(JSON.stringify({ id: "inf", lr: [{ $float: "inf" }], param_groups: [{ params: ["x"], options: { lr: { $float: "nan" } } }] }));
          return;
        }
        if (req.url.startsWith("/text")) {
          res.writeHead(502, { "Content-Type": "text/plain" });
          res.end("bad gateway");
          return;
        }
        res.writeHead(200, { "Content-Type": "application/json", "X-Optserve-Version": "7", "X-Optserve-Step": "3", ETag: '"7"' });
        res.end(JSON.stringify({ version: 7, step: 3, lr: [0.1], skipped: false, params: { x: { dtype: "float32", shape: [1], data: ["NaN"] } } }));
      });
    });
    await new Promise((r) => server.listen(0, "127.0.0.1", r));
    baseUrl = `http://127.0.0.1:${server.address().port}/`;
  });
  after(() => {
    server.closeAllConnections?.();
    server.close();
  });

  test("descriptions and scheduler steps carry non-finite numbers as numbers, not tags", async () => {
    const c = new OptserveClient({ baseUrl });
    for (const got of [await c.getSession("inf"), await c.schedulerStep("inf")]) {
      assert.equal(got.lr[0], Infinity);
      assert.ok(Number.isNaN(got.param_groups[0].options.lr));
      assert.deepEqual(got.param_groups[0].params, ["x"]);
    }
  });

  test("a parameter name with a comma cannot be pulled by name (?names= splits at commas)", async () => {
    const c = new OptserveClient({ baseUrl });
    const before = seen.length;
    assert.throws(() => c.getParams("s", { names: ["w", "a,b"] }), (err) => {
      assert.ok(err instanceof TypeError);
      assert.match(err.message, /comma/);
      return true;
    });
    assert.equal(seen.length, before); // nothing was sent
  });

  test("an empty list of names, or an empty name, is refused before anything is sent (the server would 422)", async () => {
    const c = new OptserveClient({ baseUrl });
    const before = seen.length;
    for (const names of [[], [""], ["w", ""]]) {
      assert.throws(() => c.getParams("s", { names }), (err) => {
        assert.ok(err instanceof TypeError);
        assert.match(err.message, /names|name cannot/);
        return true;
      });
    }
    assert.equal(seen.length, before); // nothing was sent
  });

  test("api key, JSON bodies, session ids in the path", async () => {
    const c = new OptserveClient({ baseUrl, apiKey: "secret" });
    const out = await c.step("a b/c", { x: Tensor.from([1, -0]) }, { encoding: "b64" });
    const req = seen.at(-1);
    assert.equal(req.method, "POST");
    assert.equal(req.url, "/v1/sessions/a%20b%2Fc/step?encoding=b64");
    assert.equal(req.headers.authorization, "Bearer secret");
    assert.equal(req.headers["content-type"], "application/json");
    assert.deepEqual(JSON.parse(req.body), { grads: { x: { dtype: "float32", shape: [2], b64: "AACAPwAAAIA=" } } });
    assert.ok(Number.isNaN(out.params.x.data[0]));
    assert.equal(out.etag, '"7"');
    await c.step("s", { x: Tensor.from([-0, 2]) });
    assert.equal(seen.at(-1).body.toString(), '{"grads":{"x":{"dtype":"float32","shape":[2],"data":[-0.0,2]}}}');
    await c.getParams("s", { names: ["a", "b"] });
    assert.equal(seen.at(-1).url, "/v1/sessions/s/params?names=a%2Cb");
  });

  test("binary requests are safetensors", async () => {
    const c = new OptserveClient({ baseUrl });
    await c.createSession({ id: "123", optimizer: "Adam", options: { lr: 0.5 }, param_groups: [{ params: { w: Tensor.from([1, 2]) }, lr: 0.1 }] }, { binary: true }).catch(() => {});
    const req = seen.at(-1);
    assert.equal(req.headers["content-type"], "application/octet-stream");
    const { tensors, metadata } = readSafetensors(new Uint8Array(req.body));
    assert.deepEqual(Array.from(tensors.w.data), [1, 2]);
    assert.deepEqual(metadata, { id: '"123"', optimizer: '"Adam"', options: '{"lr":0.5}', param_groups: '[{"lr":0.1,"params":["w"]}]' });
  });

  test("createSession({encoding: 'b64'}) sends b64 JSON tensors, in groups too", async () => {
    const c = new OptserveClient({ baseUrl });
    const w = Tensor.from([1, -0], { dtype: "float64" });
    await c.createSession({ optimizer: "SGD", options: { lr: 0.1 }, params: { w } }, { encoding: "b64" });
    assert.deepEqual(JSON.parse(seen.at(-1).body), {
      optimizer: "SGD", options: { lr: 0.1 }, params: { w: { dtype: "float64", shape: [2], b64: "AAAAAAAA8D8AAAAAAAAAgA==" } },
    });
    await c.createSession({ optimizer: "SGD", paramGroups: [{ params: { w }, lr: 0.5 }] }, { encoding: "b64" });
    assert.deepEqual(JSON.parse(seen.at(-1).body).param_groups, [{ lr: 0.5, params: { w: { dtype: "float64", shape: [2], b64: "AAAAAAAA8D8AAAAAAAAAgA==" } } }]);
    await c.createSession({ optimizer: "SGD", params: { w } }, { encoding: "data" });
    assert.equal(seen.at(-1).body.toString(), '{"optimizer":"SGD","params":{"w":{"dtype":"float64","shape":[2],"data":[1,-0.0]}}}');
    assert.throws(() => c.createSession({ optimizer: "SGD", params: { w } }, { encoding: "hex" }), TypeError);
  });

  test("tensor options travel in the encoding asked (b64), as the tensors of the same call do", async () => {
    const c = new OptserveClient({ baseUrl });
    const lr = Tensor.scalar(0.5); // float32 0.5: bytes 00 00 00 3f
    const asB64 = { dtype: "float32", shape: [], b64: "AAAAPw==" };
    const asData = { dtype: "float32", shape: [], data: [0.5] };
    const body = () => JSON.parse(seen.at(-1).body);
    await c.createSession({ optimizer: "Adam", options: { lr }, params: { w: Tensor.from([1]) } }, { encoding: "b64" });
    assert.deepEqual(body().options.lr, asB64);
    await c.createSession({ optimizer: "Adam", paramGroups: [{ params: { w: Tensor.from([1]) }, lr }] }, { encoding: "b64" });
    assert.deepEqual(body().param_groups[0].lr, asB64);
    await c.step("s", { w: Tensor.from([1]) }, { encoding: "b64", paramGroups: { 0: { lr } } });
    assert.deepEqual(body().param_groups, { 0: { lr: asB64 } });
    await c.step("s", { w: Tensor.from([1]) }, { paramGroups: [{ lr }] });
    assert.deepEqual(body().param_groups, [{ lr: asData }]);
    await c.updateParamGroup("s", 0, { lr }, { encoding: "b64" });
    assert.deepEqual(body(), { lr: asB64 });
    await c.updateParamGroup("s", 0, { lr });
    assert.deepEqual(body(), { lr: asData });
    await c.addParamGroup("s", { params: { v: Tensor.from([1]) }, lr }, { encoding: "b64" });
    assert.deepEqual(body(), { lr: asB64, params: { v: { dtype: "float32", shape: [1], b64: "AACAPw==" } } });
    assert.throws(() => c.addParamGroup("s", { params: {} }, { encoding: "hex" }), TypeError);
    assert.throws(() => c.updateParamGroup("s", 0, {}, { encoding: "hex" }), TypeError);
  });

  test("a non-finite scheduler metric is sent as the protocol writes it, not as null", async () => {
    const c = new OptserveClient({ baseUrl });
    for (const [metric, body] of [[NaN, '{"metric":{"$float":"nan"}}'], [Infinity, '{"metric":{"$float":"inf"}}'],
      [-Infinity, '{"metric":{"$float":"-inf"}}'], [0.25, '{"metric":0.25}']]) {
      await c.schedulerStep("s", { metric });
      assert.equal(seen.at(-1).body.toString(), body, String(metric));
    }
    await c.schedulerStep("s");
    assert.equal(seen.at(-1).body.toString(), "{}");
  });

  test("problem+json to typed errors", async () => {
    const c = new OptserveClient({ baseUrl, maxRetries: 0 }); // (a 503 is retried: not here)
    const classes = {
      400: BadRequestError, 401: AuthenticationError, 403: PermissionDeniedError, 404: NotFoundError, 409: ConflictError,
      412: PreconditionFailedError, 413: PayloadTooLargeError, 422: ValidationError, 429: RateLimitError, 500: OptserveError, 503: UnavailableError,
      507: StorageFullError,
    };
    for (const [status, Cls] of Object.entries(classes)) {
      const err = await c.request("GET", `/status/${status}`).catch((e) => e);
      assert.equal(err.constructor, Cls, `status ${status}`);
      assert.ok(err instanceof OptserveError);
      assert.equal(err.name, Cls.name);
      assert.equal(err.status, Number(status));
      assert.equal(err.code, "x");
      assert.equal(err.field, "a.b");
      assert.equal(err.detail, "went wrong");
      assert.equal(err.problem.title, "T");
      assert.equal(err.retryAfter, undefined, `status ${status}: no Retry-After header`);
    }
    const later = await new OptserveClient({ baseUrl, maxRetries: 0 }).request("GET", "/status/503?after=2").catch((e) => e);
    assert.equal(later.retryAfter, 2);
    const text = await c.request("GET", "/text").catch((e) => e);
    assert.equal(text.status, 502);
    assert.equal(text.detail, "bad gateway");
  });

  test("timeoutMs gives a ConnectionError with code timeout", async () => {
    const c = new OptserveClient({ baseUrl, timeoutMs: 200, maxRetries: 0 });
    const err = await c.request("GET", "/hang").catch((e) => e);
    assert.ok(err instanceof ConnectionError, String(err));
    assert.equal(err.code, "timeout");
    assert.equal(err.status, 0);
    assert.equal(err.message, `GET ${baseUrl.replace(/\/$/, "")}/hang: no answer from optserve within 200 ms`);
  });

  test("no answer is retried (maxRetries, same key); a 503 after its Retry-After", async () => {
    const c = new OptserveClient({ baseUrl, timeoutMs: 200, maxRetries: 2, retryDelayMs: 1 });
    const before = seen.length;
    const err = await c.request("POST", "/hang", { json: {} }).catch((e) => e);
    assert.ok(err instanceof ConnectionError, String(err));
    const tries = seen.slice(before);
    assert.equal(tries.length, 3);
    assert.equal(new Set(tries.map((r) => r.headers["idempotency-key"])).size, 1);
    const again = seen.length;
    const unavailable = await c.request("GET", "/status/503").catch((e) => e);
    assert.equal(unavailable.status, 503);
    assert.equal(seen.length - again, 3);
    const refused = seen.length;
    await c.request("GET", "/status/422").catch((e) => e);
    assert.equal(seen.length - refused, 1); // never retried
  });

  test("a connection that breaks mid-answer is a ConnectionError, not 'cannot reach'", async () => {
    const c = new OptserveClient({ baseUrl, timeoutMs: 5000, maxRetries: 0 });
    const err = await c.request("GET", "/cut").catch((e) => e);
    assert.ok(err instanceof ConnectionError, String(err));
    assert.equal(err.code, "connection_error");
    assert.equal(err.status, 0);
    assert.match(err.message, new RegExp(`^GET ${baseUrl.replace(/\/$/, "")}/cut: the connection to optserve broke while reading the answer: \\S`));
  });
});
