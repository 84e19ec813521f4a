// Options that JSON cannot write as plain numbers: +inf where torch gives it a meaning (ASGD's
// t0: never average) and tensor options (a tensor lr), in every call that takes options.
import assert from "node:assert/strict";
import { after, describe, test } from "node:test";

import { Tensor } from "../optserve.js";
import { NO_SERVER, assertBits, assertSameTensor, client, reference, uid } from "./helpers.js";

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

  test("a tensor lr travels base64 under encoding b64 (create, PATCH, a step's changes, an added group) and steps as torch does", async () => {
    const ref = reference().adam_tensor_lr; // torch.optim.Adam with a tensor lr on this machine
    const sent = [];
    const spy = client({ fetch: (url, init) => { sent.push(init); return fetch(url, init); } });
    const lrAt = (i) => new Tensor("float32", [], Float32Array.from(ref.steps[i].lr.data));
    const bytesOf = (t) => Buffer.from(t.toBytes()).toString("base64");
    // the JSON tensor each call sent for the lr: base64 of its float32 bytes, no decimal data
    const sentLr = (pick, t, what) => {
      const lr = pick(JSON.parse(sent.at(-1).body));
      assert.deepEqual(lr, { dtype: "float32", shape: [], b64: bytesOf(t) }, what);
    };
    const id = uid("b64-lr");
    made.push(id);
    const w0 = new Tensor("float32", ref.params0.w.shape, Float32Array.from(ref.params0.w.data));
    await spy.createSession({ id, optimizer: "Adam", options: { lr: lrAt(0) }, params: { w: w0 } }, { encoding: "b64" });
    sentLr((b) => b.options.lr, lrAt(0), "create");
    const grads = (i) => ({ w: new Tensor("float32", ref.steps[i].grads.w.shape, Float32Array.from(ref.steps[i].grads.w.data)) });
    for (const [i, st] of ref.steps.entries()) {
      let out;
      if (i === 2) {
        await spy.updateParamGroup(id, 0, { lr: lrAt(2) }, { encoding: "b64" });
        sentLr((b) => b.lr, lrAt(2), "PATCH");
      }
      if (i === 3) {
        out = await spy.step(id, grads(i), { encoding: "b64", paramGroups: { 0: { lr: lrAt(3) } } });
        sentLr((b) => b.param_groups["0"].lr, lrAt(3), "step");
      } else {
        out = await c.step(id, grads(i), { encoding: "b64" });
      }
      assertBits(out.params.w, st.params.w, `step ${i + 1}`);
    }
    const desc = await spy.addParamGroup(id, { params: { v: Tensor.from([1, 2]) }, lr: lrAt(3) }, { encoding: "b64" });
    sentLr((b) => b.lr, lrAt(3), "added group");
    assert.deepEqual(JSON.parse(sent.at(-1).body).params.v, { dtype: "float32", shape: [2], b64: bytesOf(Tensor.from([1, 2])) });
    assert.deepEqual(desc.lr, [ref.steps[3].lr.data[0], ref.steps[3].lr.data[0]]);
  });

  for (const binary of [false, true]) {
    test(`"$fill" fills the tensor lr the defaults and both groups hold, as a scheduler does; a PATCH without it replaces (${binary ? "safetensors" : "JSON"})`, async () => {
      const id = uid("fill-lr");
      made.push(id);
      // a tensor lr given as the default: one tensor in torch, the defaults' and both groups'
      await c.createSession({ id, optimizer: "Adam", options: { lr: Tensor.scalar(0.01) }, paramGroups: [{ params: { w: x0() } }, { params: { b: Tensor.from([1]) } }] });
      const lrs = (d) => [d.defaults.lr, ...d.param_groups.map((g) => g.lr)];
      const half = Tensor.scalar(0.005);
      await c.step(id, { w: Tensor.from([0.1, 0.2, 0.3]) }, { binary, paramGroups: { 0: { lr: half, $fill: ["lr"] } } });
      let desc = await c.getSession(id);
      for (const [i, lr] of lrs(desc).entries()) assertSameTensor(lr, half, `lr ${i} after the fill`);
      desc = await c.addParamGroup(id, { params: { v: Tensor.from([2]) } }); // starts from the defaults'
      assertSameTensor(desc.param_groups[2].lr, half, "the added group's lr");
      desc = await c.updateParamGroup(id, 1, { lr: Tensor.scalar(0.2) }); // group["lr"] = v
      assertSameTensor(desc.param_groups[1].lr, Tensor.scalar(0.2), "the replaced lr");
      for (const lr of [desc.defaults.lr, desc.param_groups[0].lr, desc.param_groups[2].lr]) assertSameTensor(lr, half, "left as it was");
      const refused = await c.step(id, {}, { binary, paramGroups: { 0: { lr: Tensor.scalar(-1), $fill: ["lr"] } } }).catch((e) => e);
      assert.equal(refused.status, 422);
      assert.deepEqual(lrs(await c.getSession(id)), lrs(desc));
    });
  }
});
