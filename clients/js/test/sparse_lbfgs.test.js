// Embedding tables and LBFGS against a live server: sparse pushes (SparseRows), touched rows,
// row pulls, and LBFGS steps driven by an async evaluate callback, bit for bit against the
// server's torch (make_reference.py).
import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { SparseRows, Tensor, ValidationError, readSafetensors, writeSafetensors } from "../optserve.js";
import { NO_SERVER, assertBits, client, reference, refTensor, uid } from "./helpers.js";

function rowsOf(v, rows) {
  // a reference matrix's rows, as a reference vector
  const width = v.shape[1];
  return {
    dtype: v.dtype, shape: [rows.length, width],
    data: rows.flatMap((r) => v.data.slice(r * width, (r + 1) * width)),
    bits: rows.flatMap((r) => v.bits.slice(r * width, (r + 1) * width)),
  };
}

describe("embedding tables (live server)", { skip: NO_SERVER }, () => {
  for (const binary of [false, true]) {
    test(`SparseAdam with sparse pushes and touched rows (${binary ? "safetensors" : "JSON"})`, async () => {
      const ref = reference().sparse_adam;
      const c = client();
      const id = uid("js-emb");
      await c.createSession({ id, optimizer: "SparseAdam", options: ref.options, params: { emb: refTensor(ref.table0) } }, { binary });
      for (const [i, s] of ref.steps.entries()) {
        const grad = new SparseRows(s.rows, refTensor(s.values), [10, 3]);
        const out = await c.step(id, { emb: grad }, { binary, returnParams: "touched" });
        assert.equal(out.version, i + 1);
        const rows = out.params.emb;
        assert.ok(rows instanceof SparseRows);
        assert.deepEqual(rows.rows(), s.touched);
        assert.deepEqual(rows.shape, [10, 3]);
        assertBits(rows.values, s.touched_values, `step ${i} touched rows`);
      }
      const whole = await c.getParams(id, { binary });
      assertBits(whole.params.emb, ref.table, "table");
      // rows pulled: a few by query, many by body, in the order asked
      const few = await c.getRows(id, { emb: [9, 0, 9] }, { binary });
      assert.deepEqual(few.params.emb.rows(), [9, 0, 9]);
      assertBits(few.params.emb.values, rowsOf(ref.table, [9, 0, 9]), "rows 9, 0, 9");
      const many = Array.from({ length: 300 }, (_, k) => (k * 7) % 10);
      const lots = await c.getRows(id, { emb: many }, { binary });
      assertBits(lots.params.emb.values, rowsOf(ref.table, many), "300 rows");
      const same = await c.getRows(id, { emb: [1] }, { ifNoneMatch: ref.steps.length });
      assert.equal(same.notModified, true);
      await c.deleteSession(id);
    });
  }

  test("accumulated sparse pushes, refusals", async () => {
    const c = client();
    const id = uid("js-emb");
    await c.createSession({ id, optimizer: "SGD", options: { lr: 1 }, params: { emb: Tensor.from([[1, 2], [3, 4], [5, 6]]) } });
    await c.pushGrads(id, { emb: new SparseRows([2, 2], Tensor.from([[1, 1], [1, 1]])) });
    const out = await c.step(id, { emb: new SparseRows([0], Tensor.from([[0.5, 0.5]])) }, { binary: true, returnParams: "touched" });
    assert.deepEqual(out.params.emb.rows(), [0, 2]);
    assert.deepEqual(Array.from(out.params.emb.values.data), [0.5, 1.5, 3, 4]);
    await assert.rejects(c.step(id, { emb: new SparseRows([3], Tensor.from([[1, 1]])) }), (err) => {
      assert.ok(err instanceof ValidationError);
      assert.equal(err.code, "index_out_of_range");
      assert.equal(err.field, "grads.emb.indices");
      return true;
    });
    await assert.rejects(c.getRows(id, { emb: [7] }), (err) => err.code === "index_out_of_range");
    const raw = writeSafetensors({ "emb.indices": Tensor.from([1n], { dtype: "int64" }), "emb.values": Tensor.from([[1, 1]]) });
    const { buf } = await c.request("POST", `/v1/sessions/${id}/step`, { body: raw, accept: "application/octet-stream", query: { return: "touched" } });
    const { tensors } = readSafetensors(buf);
    assert.deepEqual(Array.from(tensors["emb.values"].data), [2, 3]);
    await c.deleteSession(id);
  });
});

function quadratic([x0, x1]) {
  // the same float64 operations as make_reference.py's quadratic()
  return { loss: 4 * x0 * x0 + 0.5 * x1 * x1 + x0 * x1, grad: [8 * x0 + x1, x1 + x0] };
}

describe("LBFGS through evaluations (live server)", { skip: NO_SERVER }, () => {
  for (const [name, binary] of [["lbfgs", false], ["lbfgs_wolfe", true]]) {
    test(`${name}: an async evaluate callback per closure call (${binary ? "safetensors" : "JSON"})`, async () => {
      const ref = reference()[name];
      const c = client();
      const id = uid("js-lbfgs");
      await c.createSession({ id, optimizer: "LBFGS", options: ref.options, params: { x: Tensor.from(ref.x0, { dtype: "float64" }) } }, { binary });
      let x = ref.x0;
      for (const [i, s] of ref.steps.entries()) {
        let calls = 0;
        const evaluate = async (params) => {
          calls += 1;
          await new Promise((r) => setTimeout(r, 1)); // a callback may take its time
          const { loss, grad } = quadratic(Array.from(params.x.data));
          return { loss, grads: { x: Tensor.from(grad, { dtype: "float64" }) } };
        };
        // every other step sends the first evaluation with the opening
        const first = i % 2 ? (() => { const { loss, grad } = quadratic(x); calls += 1; return { loss, grads: { x: Tensor.from(grad, { dtype: "float64" }) } }; })() : undefined;
        const out = await c.lbfgsStep(id, evaluate, { binary, first });
        assert.equal(out.version, i + 1);
        assert.equal(out.evaluations, s.evaluations);
        assert.equal(calls, s.evaluations);
        assert.ok(Object.is(out.loss, s.loss), `loss ${out.loss} vs ${s.loss}`);
        assertBits(out.params.x, s.x, `step ${i}`);
        x = Array.from(out.params.x.data);
      }
      await c.deleteSession(id);
    });
  }

  test("abandoning an open step leaves the session as it was", async () => {
    const c = client();
    const id = uid("js-lbfgs");
    await c.createSession({ id, optimizer: "LBFGS", options: { lr: 1 }, params: { x: Tensor.from([1, 2], { dtype: "float64" }) } });
    const q = await c.openEvaluationStep(id, undefined, { timeoutS: 30 });
    assert.equal(q.needs, "evaluation");
    assert.equal(q.evaluations, 0);
    assert.equal(await c.abandonStep(id, q.step_id), "abandoned");
    const s = await c.getSession(id);
    assert.equal(s.version, 0);
    await assert.rejects(c.evaluate(id, q.evaluation, { loss: 1, grads: {} }), (err) => err.code === "step_ended");
    await c.deleteSession(id);
  });
});
