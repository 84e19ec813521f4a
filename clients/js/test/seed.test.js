// The seed example, number for number against in-process torch (make_reference.py, run on this machine).
import assert from "node:assert/strict";
import { after, describe, test } from "node:test";

import { Tensor } from "../optserve.js";
import { NO_SERVER, assertBits, client, reference, uid } from "./helpers.js";

describe("seed example: f(x) = 4x^2, x0 = 2", { skip: NO_SERVER }, () => {
  const c = client();
  const ref = reference(); // computed by this machine's torch
  const made = [];
  after(async () => {
    for (const id of made) await c.deleteSession(id).catch(() => {});
  });

  test("SGD lr=1: x1 = -14, x2 = 98", async () => {
    const id = uid("seed-lr1");
    made.push(id);
    const desc = await c.createSession({ id, optimizer: "SGD", options: { lr: 1 }, params: { x: Tensor.from([2]) } });
    assert.equal(desc.id, id);
    assert.equal(desc.version, 0);
    assert.equal(desc.step, 0);
    let x = Tensor.from([2]);
    const expected = [-14, 98];
    for (let i = 0; i < 2; i++) {
      const grad = new Tensor("float32", [1], Float32Array.of(8 * x.data[0]));
      const out = await c.step(id, { x: grad });
      x = out.params.x;
      assert.equal(x.dtype, "float32");
      assert.deepEqual(x.shape, [1]);
      assert.equal(x.data[0], expected[i]);
      assertBits(x, ref.seed_lr1.steps[i], `x${i + 1}`);
      assert.equal(out.version, i + 1);
      assert.equal(out.step, i + 1);
      assert.deepEqual(out.lr, [1]);
      assert.equal(out.skipped, false);
      assert.equal(out.etag, `"${i + 1}"`);
    }
    const pulled = await c.getParams(id);
    assert.equal(pulled.params.x.data[0], 98);
    assert.equal(pulled.version, 2);
  });

  const seed = ref.seed_momentum;
  for (const mode of [{ name: "JSON data" }, { name: "JSON b64", encoding: "b64" }, { name: "safetensors", binary: true }]) {
    test(`SGD lr=0.1 momentum=0.9 + StepLR(10, 0.1), ${seed.steps.length} steps (${mode.name})`, async () => {
      const id = uid("seed-mom");
      made.push(id);
      const desc = await c.createSession({
        id, optimizer: seed.optimizer, options: seed.options,
        params: { x: new Tensor("float32", [1], Float32Array.of(seed.x0)) },
        scheduler: seed.scheduler,
      }, { binary: mode.binary });
      assert.equal(desc.scheduler.name, "StepLR");
      assert.deepEqual(desc.lr, [0.1]);
      let x = new Tensor("float32", [1], Float32Array.of(seed.x0));
      for (let i = 0; i < seed.steps.length; i++) {
        // 8x is exact in float32: the gradient torch's autograd computed
        const grad = new Tensor("float32", [1], Float32Array.of(8 * x.data[0]));
        const out = await c.step(id, { x: grad }, { binary: mode.binary, encoding: mode.encoding });
        x = out.params.x;
        assertBits(x, seed.steps[i].x, `x after step ${i + 1}`);
        assert.equal(out.lr.length, 1);
        assert.equal(out.lr[0], seed.steps[i].lr, `lr after step ${i + 1}`);
        assert.equal(out.step, i + 1);
        assert.equal(out.version, i + 1);
        if (i === 9) assert.equal(out.lr[0], 0.010000000000000002, "lr after 10 steps");
      }
      const after10 = await c.getSession(id);
      assert.deepEqual(after10.lr, [seed.steps.at(-1).lr]);
      assert.equal(after10.param_groups[0].lr, 0.010000000000000002);
      assert.equal(after10.step, seed.steps.length);
    });
  }
});
