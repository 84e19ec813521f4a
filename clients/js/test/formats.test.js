// JSON data vs b64 vs safetensors give identical tensors; every endpoint with checked numbers.
import assert from "node:assert/strict";
import { after, describe, test } from "node:test";

import { Tensor, ValidationError } from "../optserve.js";
import { NO_SERVER, assertSameTensor, client, reference, uid } from "./helpers.js";

// each a call's options, with a name for messages that is not one of them (not enumerable: a
// call refuses an option it does not take)
const mode = (name, options) => Object.defineProperty(options, "name", { value: name });
const MODES = [mode("data", {}), mode("b64", { encoding: "b64" }), mode("safetensors", { binary: true })];

describe("wire formats and endpoints", { skip: NO_SERVER }, () => {
  const c = client();
  const made = [];
  const session = async (spec, opts) => {
    const id = spec.id ?? uid("fmt");
    made.push(id);
    return c.createSession({ ...spec, id }, opts);
  };
  after(async () => {
    for (const id of made) await c.deleteSession(id).catch(() => {});
  });

  test("health, ready, catalogues", async () => {
    assert.deepEqual(await c.health(), { status: "ok" });
    const ready = await c.ready();
    assert.equal(ready.status, "ready");
    assert.equal(ready.device, "cpu");
    const { optimizers } = await c.listOptimizers();
    const adam = optimizers.find((o) => o.name === "Adam");
    assert.equal(adam.defaults.lr, 0.001);
    assert.deepEqual(adam.defaults.betas, [0.9, 0.999]);
    assert.equal(optimizers.find((o) => o.name === "SGD").defaults.momentum, 0);
    const { schedulers } = await c.listSchedulers();
    const steplr = schedulers.find((s) => s.name === "StepLR");
    assert.deepEqual(steplr.required, ["step_size"]);
    assert.equal(steplr.defaults.gamma, 0.1);
  });

  test("createSession with encoding b64 sends b64 tensors and makes the session data makes", async () => {
    const sent = [];
    const spy = client({ fetch: (url, init) => { sent.push(init); return fetch(url, init); } });
    // int64 beyond 2^53 and float64 bits that JSON numbers carry only as their shortest text
    const params = {
      w: new Tensor("float64", [3], Float64Array.of(0.1, -0, 5e-324)),
      v: new Tensor("float32", [2], Float32Array.of(1 / 3, -2.5)),
    };
    const groupParams = { g: Tensor.from([1.25, -3], { dtype: "float64" }) };
    const spec = (id) => ({
      id, optimizer: "Adam", options: { lr: 0.01 },
      paramGroups: [{ params, weight_decay: 0.1 }, { params: groupParams, lr: 0.5 }],
    });
    const ids = [uid("b64c"), uid("datac")];
    made.push(...ids);
    await spy.createSession(spec(ids[0]), { encoding: "b64" });
    const body = JSON.parse(sent.at(-1).body);
    assert.deepEqual(Object.keys(body.param_groups[0].params.w).sort(), ["b64", "dtype", "shape"]);
    assert.ok("b64" in body.param_groups[1].params.g);
    await c.createSession(spec(ids[1]));
    const grads = { w: Tensor.from([1, -1, 0.5], { dtype: "float64" }), v: Tensor.from([0.25, 4]), g: Tensor.from([-0.5, 2], { dtype: "float64" }) };
    const [a, b] = [await c.step(ids[0], grads), await c.step(ids[1], grads)];
    for (const n of Object.keys(grads)) assertSameTensor(a.params[n], b.params[n], n);
    assertSameTensor((await c.getParams(ids[0], { encoding: "b64" })).params.w, a.params.w, "w");
    // without groups too
    const single = uid("b64s");
    made.push(single);
    await spy.createSession({ id: single, optimizer: "SGD", options: { lr: 0.1 }, params }, { encoding: "b64" });
    assert.ok("b64" in JSON.parse(sent.at(-1).body).params.v);
    for (const n of Object.keys(params)) assertSameTensor((await c.getParams(single, { encoding: "b64" })).params[n], params[n], n);
  });

  test("params of every float dtype read back bit-identical as data, b64 and safetensors", async () => {
    const params = {
      f32: new Tensor("float32", [2, 3], Float32Array.of(1 / 3, -0, 1e-45, 3.4028234663852886e38, -1.5, 0.1)),
      f64: new Tensor("float64", [3], Float64Array.of(0.1, -1 / 3, 5e-324)),
      f16: Tensor.from([0.1, -65504, 6e-8], { dtype: "float16" }),
      bf16: Tensor.from([0.1, -3.140625, 1e30], { dtype: "bfloat16" }),
      s: Tensor.scalar(2.5),
    };
    for (const create of [{}, { binary: true }]) {
      const desc = await session({ optimizer: "SGD", options: { lr: 0.5 }, params }, create);
      assert.deepEqual(desc.params.f16, { dtype: "float16", shape: [3] });
      assert.deepEqual(desc.params.s, { dtype: "float32", shape: [] });
      for (const mode of MODES) {
        const got = await c.getParams(desc.id, mode);
        assert.equal(got.version, 0);
        assert.equal(got.step, 0);
        assert.deepEqual(Object.keys(got.params).sort(), Object.keys(params).sort());
        for (const [n, t] of Object.entries(params)) assertSameTensor(got.params[n], t, `${n} via ${mode.name}`);
      }
      const some = await c.getParams(desc.id, { names: ["f64", "s"] });
      assert.deepEqual(Object.keys(some.params).sort(), ["f64", "s"]);
    }
  });

  test("the same steps sent as data, b64 and safetensors give identical params", async () => {
    const w0 = new Tensor("float32", [4], Float32Array.of(0.5, -0.25, 1 / 3, 2));
    const grads = [Float32Array.of(0.1, -0.2, 0.3, 1 / 7), Float32Array.of(-1, 0.5, 1e-3, 1 / 3)];
    const finals = [];
    for (const mode of MODES) {
      const { id } = await session({ optimizer: "Adam", options: { lr: 0.1 }, params: { w: w0 } });
      let out;
      for (const g of grads) out = await c.step(id, { w: new Tensor("float32", [4], g) }, mode);
      assert.equal(out.version, 2);
      assert.equal(out.step, 2);
      finals.push(out.params.w);
      const pulled = await c.getParams(id, mode);
      assertSameTensor(pulled.params.w, out.params.w, `pulled after ${mode.name}`);
    }
    assertSameTensor(finals[1], finals[0], "b64 vs data");
    assertSameTensor(finals[2], finals[0], "safetensors vs data");
    assert.ok(!finals[0].equals(w0), "the params moved");
  });

  test("SGD arithmetic through put params, add/update param group, return=none", async () => {
    const { id } = await session({ optimizer: "SGD", options: { lr: 0.5 }, params: { a: Tensor.from([1, 2]) } });
    let out = await c.step(id, { a: Tensor.from([0.5, -1]) });
    assert.deepEqual(Array.from(out.params.a.data), [0.75, 2.5]); // x - 0.5 g
    for (const mode of MODES) {
      const put = await c.putParams(id, { a: Tensor.from([4, 8]) }, mode);
      assert.deepEqual(Array.from(put.params.a.data), [4, 8]);
    }
    assert.equal((await c.getSession(id)).version, 4); // 1 step + 3 overwrites
    let desc = await c.addParamGroup(id, { params: { b: Tensor.from([1], { dtype: "float64" }) }, lr: 0.25 });
    assert.deepEqual(desc.param_groups.map((g) => g.params), [["a"], ["b"]]);
    assert.deepEqual(desc.lr, [0.5, 0.25]);
    desc = await c.addParamGroup(id, { params: { h: Tensor.from([2, 2]) }, lr: 1, momentum: 0.5 }, { binary: true });
    assert.equal(desc.param_groups[2].momentum, 0.5);
    desc = await c.updateParamGroup(id, 1, { lr: 0.125 });
    assert.deepEqual(desc.lr, [0.5, 0.125, 1]);
    out = await c.step(id, { a: Tensor.from([2, 2]), b: Tensor.from([2], { dtype: "float64" }) }, { binary: true });
    assert.deepEqual(Array.from(out.params.a.data), [3, 7]);
    assert.deepEqual(Array.from(out.params.b.data), [0.75]);
    assert.deepEqual(Array.from(out.params.h.data), [2, 2], "no grad: skipped by torch");
    assert.deepEqual(out.lr, [0.5, 0.125, 1]);
    const none = await c.step(id, { h: Tensor.from([1, -1]) }, { returnParams: false });
    assert.equal(none.params, undefined);
    assert.equal(none.step, 3);
    const noneBin = await c.step(id, {}, { returnParams: false, binary: true });
    assert.equal(noneBin.params, undefined);
    assert.equal(noneBin.step, 4);
    assert.equal(noneBin.skipped, false);
    const pulled = await c.getParams(id, { names: ["h"] });
    assert.deepEqual(Array.from(pulled.params.h.data), [1, 3]);
  });

  test("accumulated grads: two pushes form one step; zero_grad clears", async () => {
    const x0 = Tensor.from([1, -1, 0.5]);
    const g = Float32Array.of(0.3, -0.7, 1 / 3);
    const half = Float32Array.from(g, (v) => v / 2); // exact halves
    const spec = { optimizer: "SGD", options: { lr: 0.1, momentum: 0.9 }, params: { x: x0 } };
    const { id: plain } = await session(spec);
    const { id: acc } = await session(spec);
    const want = (await c.step(plain, { x: new Tensor("float32", [3], g) })).params.x;
    let pushed = await c.pushGrads(acc, { x: new Tensor("float32", [3], half) });
    assert.deepEqual(pushed.accumulated, ["x"]);
    pushed = await c.pushGrads(acc, { x: new Tensor("float32", [3], half) }, { binary: true });
    assert.deepEqual(pushed.accumulated, ["x"]);
    let got = await c.step(acc, {});
    assertSameTensor(got.params.x, want, "accumulated step");
    await c.pushGrads(acc, { x: Tensor.from([100, 100, 100]) });
    const zeroed = await c.zeroGrad(acc);
    assert.deepEqual(zeroed.accumulated, []);
    const want2 = (await c.step(plain, { x: new Tensor("float32", [3], g) })).params.x;
    got = await c.step(acc, { x: new Tensor("float32", [3], g) });
    assertSameTensor(got.params.x, want2, "after zero_grad");
  });

  test("manual scheduler step", async () => {
    const { id } = await session({
      optimizer: "SGD", options: { lr: 0.1 }, params: { x: Tensor.from([1]) },
      scheduler: { name: "StepLR", options: { step_size: 1, gamma: 0.5 }, step_on: "manual" },
    });
    const s1 = await c.step(id, { x: Tensor.from([1]) });
    assert.deepEqual(s1.lr, [0.1]);
    const sch = await c.schedulerStep(id);
    assert.deepEqual(sch.lr, [0.05]);
    const s2 = await c.step(id, { x: Tensor.from([1]) });
    assert.equal(s2.params.x.data[0], Math.fround(Math.fround(1 - 0.1) - Math.fround(0.05)));
    const plateau = await session({
      optimizer: "SGD", options: { lr: 1 }, params: { x: Tensor.from([1]) },
      scheduler: { name: "ReduceLROnPlateau", options: { patience: 0, factor: 0.5 } },
    });
    // the lrs torch's own ReduceLROnPlateau gives on this machine for these metrics
    const ref = reference().plateau_nonfinite;
    const value = { nan: NaN, inf: Infinity, "-inf": -Infinity };
    for (const [i, name] of ref.metrics.entries()) {
      const metric = name in value ? value[name] : Number(name);
      // a non-finite metric reaches the server as one ({"$float": "nan"}; JSON.stringify
      // would write null, read as no metric) and steps it as torch steps on it
      const r = await c.schedulerStep(plateau.id, { metric });
      assert.deepEqual(r.lr, [ref.lrs[i]], `${name}`);
    }
    // a scheduler that takes no metric refuses one, finite or not; nothing changes
    for (const metric of [NaN, Infinity, -Infinity, 1]) {
      const before = await c.getSession(id);
      const err = await c.schedulerStep(id, { metric }).catch((e) => e);
      assert.ok(err instanceof ValidationError, `${metric}: ${err}`);
      assert.equal(err.code, "invalid_metric");
      assert.equal(err.field, "metric");
      const now = await c.getSession(id);
      assert.deepEqual([now.lr, now.version], [before.lr, before.version]);
    }
  });

  test("non-finite gradients under the allow and skip policies", async () => {
    const grads = { w: Tensor.from([NaN, Infinity, 1]) };
    const allow = await session({ nonfinite: "allow", optimizer: "SGD", options: { lr: 1 }, params: { w: Tensor.from([1, 2, 3]) } });
    for (const mode of MODES) {
      const out = await c.step(allow.id, grads, mode);
      assert.deepEqual(out.nonfinite, ["w"], mode.name);
      assert.equal(out.skipped, false);
      const [a, b, x] = out.params.w.data;
      assert.ok(Number.isNaN(a) && b === -Infinity, `${mode.name}: ${out.params.w.data}`);
      assert.equal(x, 3 - out.step);
    }
    // the step's norms are then non-finite: numbers, as in the history, not the wire's $float tags
    const inf = await session({ nonfinite: "allow", optimizer: "SGD", options: { lr: 1 }, params: { w: Tensor.from([1, 2]) } });
    for (const mode of MODES) {
      const out = await c.step(inf.id, { w: Tensor.from([Infinity, 1]) }, mode);
      const [group] = out.metrics.groups;
      assert.equal(group.grad_norm, Infinity, `${mode.name}: ${JSON.stringify(group)}`);
      assert.equal(group.param_norm, Infinity, mode.name);
      assert.ok(Number.isNaN(group.update_ratio), `${mode.name}: ${JSON.stringify(group)}`);
    }
    const skip = await session({ nonfinite: "skip", optimizer: "SGD", options: { lr: 1 }, params: { w: Tensor.from([1, 2, 3]) } });
    const out = await c.step(skip.id, grads, { binary: true });
    assert.equal(out.skipped, true);
    assert.deepEqual(out.nonfinite, ["w"]);
    assert.deepEqual(Array.from(out.params.w.data), [1, 2, 3]);
    assert.equal(out.version, 0);
  });

  test("list and delete sessions", async () => {
    const { id } = await session({ optimizer: "SGD", options: { lr: 1 }, params: { x: Tensor.from([1]) } });
    assert.ok((await c.listSessions()).some((s) => s.id === id));
    await c.deleteSession(id);
    assert.ok(!(await c.listSessions()).some((s) => s.id === id));
  });
});
