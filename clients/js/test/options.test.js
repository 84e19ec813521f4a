// Options that JSON cannot write as plain numbers: +inf where torch gives it a meaning (ASGD's
// t0: never average) and tensor options (a tensor lr), in every call that takes options.
import assert from "node:assert/strict";
import { after, describe, test } from "node:test";

import { Tensor } from "../optserve.js";
import { NO_SERVER, assertBits, client, reference, uid } from "./helpers.js";

describe("non-finite and tensor options", { skip: NO_SERVER }, () => {
  const c = client();
  const made = [];
  after(async () => {
    for (const id of made) await c.deleteSession(id).catch(() => {});
  });
  const x0 = () => Tensor.from([1, -2, 0.5]);

  for (const binary of [false, true]) {
    test(`ASGD with t0 = Infinity at create (${binary ? "safetensors" : "JSON"}) steps as torch does`, async () => {
      const ref = reference().asgd_t0_inf; // torch.optim.ASGD(lr=0.05, t0=inf) on this machine
      const id = uid("asgd-inf");
      made.push(id);
      const desc = await c.createSession({ id, optimizer: "ASGD", options: { lr: 0.05, t0: Infinity }, params: { x: x0() } }, { binary });
      assert.equal(desc.param_groups[0].t0, Infinity);
      for (const [i, st] of ref.steps.entries()) {
        const out = await c.step(id, { x: Tensor.from(st.grads.x.data) });
        assertBits(out.params.x, st.params.x, `step ${i + 1}`);
      }
      const state = await c.exportState(id);
      assert.equal(state.param_groups[0].t0, Infinity);
      assertBits(state.state["0"].ax, ref.final_state.x.ax, "ax");
    });
  }

  test("Infinity in a group's PATCH and in an added group; a tensor lr at create", async () => {
    const id = uid("opt-inf");
    made.push(id);
    await c.createSession({ id, optimizer: "ASGD", options: { lr: 0.05 }, params: { x: x0() } });
    let desc = await c.updateParamGroup(id, 0, { t0: Infinity });
    assert.equal(desc.param_groups[0].t0, Infinity);
    desc = await c.addParamGroup(id, { params: { y: Tensor.from([3]) }, t0: Infinity });
    assert.equal(desc.param_groups[1].t0, Infinity);
    desc = await c.addParamGroup(id, { params: { z: Tensor.from([3]) }, t0: Infinity }, { binary: true });
    assert.equal(desc.param_groups[2].t0, Infinity);

    const tid = uid("opt-tensor-lr");
    made.push(tid);
    for (const binary of [false, true]) {
      const sid = `${tid}-${binary ? "st" : "json"}`;
      made.push(sid);
      const made1 = await c.createSession({ id: sid, optimizer: "SGD", options: { lr: Tensor.scalar(0.5) }, params: { x: Tensor.from([2]) } }, { binary });
      assert.deepEqual(made1.lr, [0.5]);
      const out = await c.step(sid, { x: Tensor.from([16]) });
      assert.deepEqual(Array.from(out.params.x.data), [-6]); // 2 - 0.5 * 16, exact
    }
  });
});
