// A misspelt option of a call throws a TypeError naming it, before any request: a destructured
// options object used to drop it without a word (`importState(id, state, {baseVerison: 3})`
// imported unconditionally over a session that had moved on).
import assert from "node:assert/strict";
import { after, describe, test } from "node:test";

import { OptserveClient, Tensor, encodeJsonTensor, treeToJson } from "../optserve.js";
import { NO_SERVER, assertSameTensor, client, uid } from "./helpers.js";

describe("options of a call", () => {
  test("a misspelt option is a TypeError naming it, before anything is sent", async () => {
    let requests = 0;
    const c = new OptserveClient({ baseUrl: "http://127.0.0.1:9", fetch: async () => { requests += 1; throw new Error("sent"); } });
    const calls = [
      ["importState", () => c.importState("s", {}, { baseVerison: 3 }), "baseVerison"],
      ["step", () => c.step("s", {}, { retrunParams: false }), "retrunParams"],
      ["getParams", () => c.getParams("s", { minVerison: 9, waitS: 30 }), "minVerison"],
      ["deleteSession", () => c.deleteSession("s", { ifMatch: "5" }), "ifMatch"],
      ["pushGrads", () => c.pushGrads("s", {}, { worker: "w1" }), "worker"],
      ["createSession", () => c.createSession({}, { idempotencykey: "k" }), "idempotencykey"],
      ["exportState", () => c.exportState("s", { fromat: "torch" }), "fromat"],
      ["schedulerStep", () => c.schedulerStep("s", { metrics: 1 }), "metrics"],
    ];
    for (const [where, call, name] of calls) {
      await assert.rejects(
        async () => call(),
        (err) => err instanceof TypeError && err.message.startsWith(`${where}: unknown option "${name}"`),
        where,
      );
    }
    assert.equal(requests, 0);
    assert.throws(() => new OptserveClient({ baseURL: "http://x" }), /OptserveClient: unknown option "baseURL"/);
    assert.throws(() => Tensor.from([1], { dtpye: "float64" }), /Tensor.from: unknown option "dtpye"/);
    assert.throws(() => encodeJsonTensor(Tensor.from([1]), { base64: true }), /unknown option "base64"/);
    assert.throws(() => treeToJson({}, [true]), /options must be an object, got an array/);
    // the names each call documents are taken
    assert.equal(Tensor.from([1, 2], { dtype: "float64", shape: [2] }).dtype, "float64");
  });
});

describe("options of a call, against a server", { skip: NO_SERVER }, () => {
  const c = client();
  const made = [];
  after(async () => {
    for (const id of made) await c.deleteSession(id).catch(() => {});
  });

  test("a conditional import spelt right is a 412; misspelt, nothing is imported", async () => {
    const id = uid("call-opts");
    made.push(id);
    await c.createSession({ id, optimizer: "SGD", options: { lr: 0.5 }, params: { x: Tensor.from([1, 2]) } });
    await c.step(id, { x: Tensor.from([1, 1]) });
    const state = await c.exportState(id);
    const moved = await c.step(id, { x: Tensor.from([2, 2]) });
    await assert.rejects(async () => c.importState(id, state, { baseVerison: 1 }), TypeError);
    await assert.rejects(async () => c.importState(id, state, { baseVersion: 1 }), (err) => err.status === 412);
    const { params } = await c.getParams(id);
    assertSameTensor(params.x, moved.params.x, "not imported"); // x = [1, 2] - 0.5 - 1 = [-0.5, 0.5]
    assert.deepEqual(Array.from(params.x.data), [-0.5, 0.5]);
  });
});
