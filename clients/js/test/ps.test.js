// Parameter-server features from JS: sync rounds with named workers, bounded staleness,
// conditional and long-polled pulls, PATCH of the session's options. Values checked exactly
// (SGD lr=1 keeps the arithmetic exact in float32).
import assert from "node:assert/strict";
import { after, describe, test } from "node:test";

import { ConflictError, Tensor } from "../optserve.js";
import { NO_SERVER, client, uid } from "./helpers.js";

const grad = (v) => new Tensor("float32", [1], Float32Array.of(v));

describe("parameter-server mode", { skip: NO_SERVER }, () => {
  const c = client();
  const made = [];
  after(async () => {
    for (const id of made) await c.deleteSession(id).catch(() => {});
  });
  // a session of one parameter x = [2] stepped by SGD lr=1 (with more options: extra)
  const session = async (name, extra = {}) => {
    const id = uid(name);
    made.push(id);
    await c.createSession({ id, optimizer: "SGD", options: { lr: 1 }, params: { x: Tensor.from([2]) }, ...extra });
    return id;
  };
  const syncRound = (reduce) => ({ sync: { workers: 2, reduce, timeout_s: 30, on_timeout: "fail" } });

  test("sync round of 2 workers: mean of their gradients, stepped once, same answer to both", async () => {
    const id = await session("ps-sync", syncRound("mean"));
    const [a, b] = await Promise.all([
      c.step(id, { x: grad(2) }, { worker: "w0" }),
      c.step(id, { x: grad(4) }, { worker: "w1" }),
    ]);
    // x = 2 - 1 * mean(2, 4) = -1
    assert.equal(a.params.x.data[0], -1);
    assert.equal(b.params.x.data[0], -1);
    assert.equal(a.version, 1);
    assert.equal(b.version, 1);
    // K changed to 1 between rounds: the next push steps alone
    await c.configureSession(id, { sync: { workers: 1 } });
    const solo = await c.step(id, { x: grad(3) }, { worker: "w0" });
    assert.equal(solo.params.x.data[0], -4);
    assert.equal(solo.version, 2);
  });

  test("a worker's push waits for its round longer than timeoutMs (the round's timeout bounds it)", async () => {
    const id = await session("ps-slow-round", syncRound("sum"));
    const short = client({ timeoutMs: 300, maxRetries: 0 });
    const first = short.step(id, { x: grad(1) }, { worker: "w0" });
    await new Promise((r) => setTimeout(r, 900)); // the other worker comes late
    const second = await short.step(id, { x: grad(2) }, { worker: "w1" });
    const a = await first;
    assert.equal(a.params.x.data[0], -1); // 2 - (1 + 2)
    assert.equal(second.params.x.data[0], -1);
    assert.equal(a.version, 1);
  });

  test("a push older than max_staleness is refused and changes nothing", async () => {
    const id = await session("ps-stale", { max_staleness: 0 });
    const first = await c.step(id, { x: grad(1) }, { baseVersion: 0 });
    assert.equal(first.params.x.data[0], 1);
    await assert.rejects(c.step(id, { x: grad(1) }, { baseVersion: 0 }), (err) => {
      assert.ok(err instanceof ConflictError);
      assert.equal(err.code, "stale_gradient");
      return true;
    });
    const now = await c.getParams(id);
    assert.equal(now.version, 1);
    assert.equal(now.params.x.data[0], 1);
  });

  test("304 while the version is current; a long poll returns once a step lands", async () => {
    const id = await session("ps-poll");
    const same = await c.getParams(id, { ifNoneMatch: 0 });
    assert.equal(same.notModified, true);
    assert.equal(same.version, 0);
    const polled = c.getParams(id, { minVersion: 1, waitS: 10 });
    await new Promise((r) => setTimeout(r, 100));
    await c.step(id, { x: grad(5) });
    const got = await polled;
    assert.equal(got.version, 1);
    assert.equal(got.params.x.data[0], -3);
  });

  test("ifNoneMatch takes the etag a result carries as well as its version", async () => {
    const id = await session("ps-etag");
    const got = await c.getParams(id);
    assert.equal(got.etag, '"0"');
    const same = await c.getParams(id, { ifNoneMatch: got.etag });
    assert.equal(same.notModified, true);
    assert.equal((await c.getParams(id, { ifNoneMatch: 'W/"0"' })).notModified, true);
    assert.equal((await c.getRows(id, { x: [0] }, { ifNoneMatch: got.etag })).notModified, true);
    const out = await c.step(id, { x: grad(1) });
    assert.equal((await c.getParams(id, { ifNoneMatch: out.etag })).notModified, true);
    const moved = await c.getParams(id, { ifNoneMatch: got.etag });
    assert.equal(moved.notModified, undefined);
    assert.equal(moved.version, 1);
    for (const bad of ["abc", '"x"', -1, 1.5]) {
      assert.throws(() => c.getParams(id, { ifNoneMatch: bad }), TypeError, String(bad));
      assert.throws(() => c.getRows(id, { x: [0] }, { ifNoneMatch: bad }), TypeError, String(bad));
    }
  });

  test("a long poll longer than timeoutMs waits its wait_s out and answers", async () => {
    const id = await session("ps-longpoll");
    const short = client({ timeoutMs: 400, maxRetries: 0 });
    const whole = await short.getParams(id, { minVersion: 1, waitS: 0.8 });
    assert.equal(whole.version, 0); // nothing newer came: the current state, at wait_s
    const rows = await short.getRows(id, { x: [0] }, { minVersion: 1, waitS: 0.8 });
    assert.equal(rows.version, 0);
    assert.deepEqual(rows.params.x.rows(), [0]);
    const unchanged = await short.getParams(id, { ifNoneMatch: 0, waitS: 0.8 });
    assert.equal(unchanged.notModified, true);
  });
});
