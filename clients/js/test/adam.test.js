// Adam (float32) and AdamW/amsgrad (float64) against in-process torch, bit for bit,
// including the optimizer state they export.
import assert from "node:assert/strict";
import { after, describe, test } from "node:test";

import { NO_SERVER, assertBits, client, reference, refTensor, uid } from "./helpers.js";

describe("Adam family vs torch.optim", { skip: NO_SERVER }, () => {
  const c = client();
  const ref = reference(); // computed by this machine's torch
  const made = [];
  after(async () => {
    for (const id of made) await c.deleteSession(id).catch(() => {});
  });

  for (const [key, mode] of [["adam", {}], ["adam", { binary: true }], ["adamw_f64", {}], ["adamw_f64", { encoding: "b64" }]]) {
    const r = ref[key];
    test(`${r.optimizer} ${JSON.stringify(r.options)} ${Object.keys(r.params0)} ${JSON.stringify(mode)}`, async () => {
      const id = uid(key);
      made.push(id);
      const params = Object.fromEntries(Object.entries(r.params0).map(([n, v]) => [n, refTensor(v)]));
      const desc = await c.createSession({ id, optimizer: r.optimizer, options: r.options, params });
      assert.equal(desc.optimizer, r.optimizer);
      assert.equal(desc.defaults.lr, r.options.lr);
      for (const [i, s] of r.steps.entries()) {
        const grads = Object.fromEntries(Object.entries(s.grads).map(([n, v]) => [n, refTensor(v)]));
        const out = await c.step(id, grads, mode);
        assert.equal(out.step, i + 1);
        for (const n of Object.keys(r.params0)) assertBits(out.params[n], s.params[n], `${n} after step ${i + 1}`);
      }
      const sd = await c.exportState(id);
      assert.deepEqual(sd.param_groups[0].params, Object.keys(r.params0).map((_, i) => i));
      assert.deepEqual(sd.param_groups[0].param_names, Object.keys(r.params0));
      for (const [i, n] of Object.keys(r.params0).entries()) {
        const st = sd.state[String(i)];
        assert.deepEqual(Object.keys(st).sort(), Object.keys(r.final_state[n]).sort(), `state keys of ${n}`);
        for (const [k, v] of Object.entries(r.final_state[n])) assertBits(st[k], v, `state ${n}.${k}`);
      }
    });
  }

  for (const mode of [{}, { binary: true }]) {
    test(`metrics: "history" leaves the norms out of the answer and in the history ${JSON.stringify(mode)}`, async () => {
      const r = ref.adam;
      const params = Object.fromEntries(Object.entries(r.params0).map(([n, v]) => [n, refTensor(v)]));
      const [quiet, loud] = [uid("quiet"), uid("loud")];
      made.push(quiet, loud);
      for (const id of [quiet, loud]) await c.createSession({ id, optimizer: r.optimizer, options: r.options, params });
      assert.throws(() => c.step(quiet, {}, { metrics: "none" }), TypeError);
      for (const [i, s] of r.steps.entries()) {
        const grads = Object.fromEntries(Object.entries(s.grads).map(([n, v]) => [n, refTensor(v)]));
        const out = await c.step(quiet, grads, { ...mode, metrics: "history" });
        const twin = await c.step(loud, grads, mode);
        assert.equal(out.metrics, undefined);
        assert.ok(twin.metrics && twin.metrics.groups[0].update_norm > 0);
        for (const n of Object.keys(r.params0)) assertBits(out.params[n], s.params[n], `${n} after step ${i + 1}`);
        const h = await c._json("GET", `${c._sid(quiet)}/history`, { query: { since: i } });
        assert.deepEqual(h.columns.n, [i + 1]);
        for (const k of ["grad_norm", "update_norm", "param_norm", "update_ratio", "lr"]) {
          assert.deepEqual(h.columns[`${k}.0`], [twin.metrics.groups[0][k]], k);
        }
      }
    });
  }
});
