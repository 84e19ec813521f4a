// Export the state (JSON, b64, safetensors, torch file), re-import it, and continue identically.
import assert from "node:assert/strict";
import { after, describe, test } from "node:test";

import { PreconditionFailedError, Tensor } from "../optserve.js";
import { NO_SERVER, assertSameTensor, assertSameTree, client, uid } from "./helpers.js";

const GRADS = [
  [0.1, -0.2, 0.3, -0.4, 0.5, 1 / 3], [1, 0.5, -0.25, 2, -3, 0.125], [-0.7, 0.7, 0.01, -0.01, 4, 1],
  [0.3, 0.3, -0.3, 0.9, -1 / 7, 2], [0.05, -5, 0.6, 0.6, 0.2, -0.8],
].map((g) => ({ w: new Tensor("float32", [2, 3], Float32Array.from(g)), b: Tensor.from([g[0] * 2, g[5]]) }));

describe("state_dict export and import", { skip: NO_SERVER }, () => {
  const c = client();
  const made = [];
  after(async () => {
    for (const id of made) await c.deleteSession(id).catch(() => {});
  });

  test("Adam + StepLR: every export format re-imports and the session continues identically", async () => {
    const id = uid("state");
    made.push(id);
    await c.createSession({
      id, optimizer: "Adam", options: { lr: 0.05, amsgrad: true },
      param_groups: [
        { params: { w: new Tensor("float32", [2, 3], Float32Array.of(1, 2, 3, -1, -2, -3)) } },
        { params: { b: Tensor.from([0.5, -0.5]) }, lr: 0.01 },
      ],
      scheduler: { name: "StepLR", options: { step_size: 2, gamma: 0.5 } },
    });
    for (const g of GRADS.slice(0, 3)) await c.step(id, g);
    const p3 = (await c.getParams(id)).params;

    const fromJson = await c.exportState(id);
    const fromB64 = await c.exportState(id, { encoding: "b64" });
    const fromSt = await c.exportState(id, { format: "safetensors" });
    const torchFile = await c.exportState(id, { format: "torch" });
    assert.ok(torchFile instanceof Uint8Array && torchFile.length > 100);
    assertSameTree(fromB64, fromJson, "b64 export");
    assertSameTree(fromSt, fromJson, "safetensors export");
    // the numbers torch keeps: step counts, group options, scheduler position
    assert.deepEqual(Object.keys(fromJson.state), ["0", "1"]);
    assert.equal(fromJson.state["0"].step.item(), 3);
    assert.deepEqual(Object.keys(fromJson.state["0"]).sort(), ["exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"]);
    assert.deepEqual(fromJson.param_groups.map((g) => g.param_names), [["w"], ["b"]]);
    assert.deepEqual(fromJson.param_groups.map((g) => g.params), [[0], [1]]);
    assert.deepEqual(fromJson.param_groups.map((g) => g.lr), [0.025, 0.005]);
    assert.equal(fromJson.scheduler.last_epoch, 3);

    // the continuation the re-imported states must reproduce
    const cont = [];
    for (const g of GRADS.slice(3)) cont.push(await c.step(id, g));
    const state5 = await c.exportState(id);

    const imports = [
      ["json", () => c.importState(id, fromJson)],
      ["json b64", () => c.importState(id, fromB64, { encoding: "b64" })],
      ["safetensors", () => c.importState(id, fromSt, { format: "safetensors" })],
      ["torch file", () => c.importState(id, torchFile, { format: "torch" })],
    ];
    for (const [name, doImport] of imports) {
      await c.putParams(id, p3);
      const desc = await doImport();
      assert.equal(desc.id, id);
      assert.deepEqual(desc.lr, [0.025, 0.005], `lr after importing ${name}`);
      assert.equal(desc.scheduler.last_epoch, 3, `scheduler after importing ${name}`);
      assertSameTree(await c.exportState(id), fromJson, `state re-exported after ${name}`);
      for (const [i, g] of GRADS.slice(3).entries()) {
        const out = await c.step(id, g);
        assert.deepEqual(out.lr, cont[i].lr, `${name}: lr at step ${4 + i}`);
        for (const n of ["w", "b"]) assertSameTensor(out.params[n], cont[i].params[n], `${name}: ${n} at step ${4 + i}`);
      }
      assertSameTree(await c.exportState(id), state5, `state after continuing from ${name}`);
    }
  });

  test("a state imports into a fresh session and continues identically", async () => {
    const spec = {
      optimizer: "SGD", options: { lr: 0.1, momentum: 0.9, nesterov: true },
      params: { x: Tensor.from([1, -2, 3]) },
    };
    const a = uid("state-a");
    const b = uid("state-b");
    made.push(a, b);
    await c.createSession({ ...spec, id: a });
    const g = (k) => ({ x: Tensor.from([k, -k / 2, 1 / k]) });
    for (const k of [1, 2]) await c.step(a, g(k));
    const sd = await c.exportState(a, { format: "safetensors" });
    await c.createSession({ ...spec, id: b, params: (await c.getParams(a)).params });
    await c.importState(b, sd, { format: "safetensors" });
    for (const k of [3, 4, 5]) {
      const [ra, rb] = [await c.step(a, g(k)), await c.step(b, g(k))];
      assertSameTensor(rb.params.x, ra.params.x, `step with k=${k}`);
    }
    assert.equal((await c.getSession(b)).step, 3, "step counts the steps taken in this session");
  });

  test("a conditional import is refused (412) once the session moved on, and applies when current", async () => {
    const spec = {
      optimizer: "SGD", options: { lr: 0.1, momentum: 0.9 },
      params: { x: Tensor.from([1, -2, 3]) },
    };
    const a = uid("cond-a");
    const b = uid("cond-b"); // a twin that takes the same steps and the imports unconditionally
    made.push(a, b);
    for (const id of [a, b]) await c.createSession({ ...spec, id });
    const g = (k) => ({ x: Tensor.from([k, -k / 2, 1 / k]) });
    const both = async (k) => {
      const [ra, rb] = [await c.step(a, g(k)), await c.step(b, g(k))];
      assertSameTensor(ra.params.x, rb.params.x, `step with k=${k}`);
    };
    for (const k of [1, 2]) await both(k);
    const read = await c.getSession(a);
    const sd = await c.exportState(a);
    await both(3);
    let err = await c.importState(a, sd, { baseVersion: read.version }).catch((e) => e);
    assert.ok(err instanceof PreconditionFailedError, String(err));
    assert.equal(err.status, 412);
    assert.equal(err.code, "precondition_failed");
    assert.equal(err.field, "If-Match");
    assertSameTree(await c.exportState(a), await c.exportState(b), "nothing imported");
    const again = await c.getSession(a);
    for (const id of [a, b]) await c.updateParamGroup(id, 0, { lr: 0.05 });
    err = await c.importState(a, sd, { baseVersion: again.version, baseRevision: again.revision }).catch((e) => e);
    assert.ok(err instanceof PreconditionFailedError, String(err));
    assert.equal(err.field, "base_revision");
    assertSameTree(await c.exportState(a), await c.exportState(b), "nothing imported");
    const now = await c.getSession(a);
    const desc = await c.importState(a, sd, { baseVersion: now.version, baseRevision: now.revision });
    assert.equal(desc.version, now.version + 1);
    assert.equal(desc.revision, now.revision + 1);
    await c.importState(b, sd);
    assertSameTree(await c.exportState(a), await c.exportState(b), "the import applied");
    for (const k of [4, 5]) await both(k);
    assert.throws(() => c.importState(a, sd, { baseVersion: -1 }), TypeError);
  });
});
