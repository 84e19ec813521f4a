// Narrow wires from JS: bfloat16 gradients for float32 parameters (upcast), answers narrowed
// back to bfloat16 (paramsDtype), bit for bit against in-process torch on the widened
// gradients; the float32 master weights stay exact. And scalars recorded with the step.
import assert from "node:assert/strict";
import { after, describe, test } from "node:test";

import { Tensor } from "../optserve.js";
import { NO_SERVER, assertBits, client, reference, refTensor, uid } from "./helpers.js";

describe("bfloat16 gradients and answers vs torch.optim", { skip: NO_SERVER }, () => {
  const c = client();
  const ref = reference().adam_bf16; // computed by this machine's torch
  const made = [];
  after(async () => {
    for (const id of made) await c.deleteSession(id).catch(() => {});
  });

  /** A fresh session at the reference's starting point. */
  async function session(prefix) {
    const id = uid(prefix);
    made.push(id);
    await c.createSession({ id, optimizer: ref.optimizer, options: ref.options, params: { w: refTensor(ref.w0) } });
    return id;
  }
  /** A bfloat16 vector from its raw bits. */
  const bf = (bits) => new Tensor("bfloat16", [bits.length], Uint16Array.from(bits));

  for (const mode of [{ binary: true }, { binary: false }]) {
    test(`Adam, bfloat16 both ways ${JSON.stringify(mode)}`, async () => {
      const id = await session("bf16");
      // without upcast a narrow gradient is refused, and nothing changes
      await assert.rejects(c.step(id, { w: bf(ref.steps[0].grad_bits) }, mode), (err) => err.code === "dtype_mismatch");
      for (const [i, s] of ref.steps.entries()) {
        const out = await c.step(id, { w: bf(s.grad_bits) }, { ...mode, upcast: true, paramsDtype: "bfloat16", scalars: { loss: i + 0.5 } });
        assert.equal(out.step, i + 1);
        assert.equal(out.params.w.dtype, "bfloat16");
        assert.deepEqual(Array.from(out.params.w.data), s.answer_bits, `answer of step ${i + 1}`);
        assert.equal(out.metrics.scalars.loss, i + 0.5);
        const master = await c.getParams(id, mode);
        assertBits(master.params.w, s.master, `master weights after step ${i + 1}`);
        // a pull narrowed on the wire: the master weights narrowed as the step's answer is
        const pulled = await c.getParams(id, { ...mode, paramsDtype: "bfloat16" });
        assert.equal(pulled.version, out.version);
        assert.equal(pulled.params.w.dtype, "bfloat16");
        assert.deepEqual(Array.from(pulled.params.w.data), s.answer_bits, `narrowed pull after step ${i + 1}`);
        const rows = await c.getRows(id, { w: [2, 0, 2] }, { ...mode, paramsDtype: "bfloat16" });
        assert.equal(rows.params.w.values.dtype, "bfloat16");
        assert.deepEqual(Array.from(rows.params.w.values.data), [2, 0, 2].map((j) => s.answer_bits[j]), `narrowed rows after step ${i + 1}`);
      }
      const held = await c.getParams(id, { ...mode, paramsDtype: "bfloat16" });
      assert.equal((await c.getParams(id, { ...mode, paramsDtype: "bfloat16", ifNoneMatch: held.etag })).notModified, true);
      const err = await c.getParams(id, { ...mode, paramsDtype: "float32" }).catch((e) => e);
      assert.equal(err.status, 422, String(err));
      assert.equal(err.field, "params_dtype");
    });

    test(`Adam, bfloat16 pushes then a step ${JSON.stringify(mode)}`, async () => {
      const id = await session("bf16push");
      await assert.rejects(c.pushGrads(id, { w: bf(ref.steps[0].grad_bits) }, mode), (err) => err.code === "dtype_mismatch");
      for (const [i, s] of ref.steps.entries()) {
        // the gradient pushed (widened on the server), then a step with none of its own
        await c.pushGrads(id, { w: bf(s.grad_bits) }, { ...mode, upcast: true, scalars: { loss: 2 * i } });
        const out = await c.step(id, {}, { ...mode, paramsDtype: "bfloat16" });
        assert.deepEqual(Array.from(out.params.w.data), s.answer_bits, `answer of step ${i + 1}`);
        assert.equal(out.metrics.scalars.loss, 2 * i);
      }
      assertBits((await c.getParams(id, mode)).params.w, ref.steps.at(-1).master, "master weights");
    });
  }
});

describe("float16 JSON data that are not float16 values", { skip: NO_SERVER }, () => {
  test("the server rounds them as torch does (through float32), as a curl user sends them", async () => {
    // torch.tensor(values, dtype=torch.float16): each double through float32 to float16
    const ref = reference().half_rounding;
    const keep = ref.values.map((_, i) => i).filter((i) => (ref.float16[i] & 0x7c00) !== 0x7c00); // finite
    const values = keep.map((i) => ref.values[i]);
    const c = client();
    const id = uid("f16-data");
    await c.createSession({ id, optimizer: "SGD", options: { lr: 1 }, params: { x: new Tensor("float16", [values.length], new Uint16Array(values.length)) } });
    // the doubles as they are (no client-side rounding): x = 0 - 1 * g = -g
    const { buf } = await c.request("POST", `/v1/sessions/${id}/step`, { json: { grads: { x: { dtype: "float16", shape: [values.length], data: values } } } });
    const x = JSON.parse(new TextDecoder().decode(buf)).params.x;
    const got = Tensor.from(x.data, { dtype: "float16" });
    assert.deepEqual(Array.from(got.data), keep.map((i) => ref.float16[i] ^ 0x8000));
    // a double that float32 rounds to 65520 is past float16's range for torch: refused, not 65504
    const past = ref.values[ref.float16.indexOf(0x7c00)];
    const err = await c.request("POST", `/v1/sessions/${id}/step`, { json: { grads: { x: { dtype: "float16", shape: [1], data: [past] } } } }).catch((e) => e);
    assert.equal(err.status, 422, String(err));
    assert.equal(err.field, "grads.x.data");
    await c.deleteSession(id);
  });
});
