// Conditional changes (baseVersion: If-Match, baseRevision: ?base_revision=) on every change that
// takes them: refused (PreconditionFailedError, 412) with nothing changed once the session moved on,
// applied when current. A twin session takes the same steps and the changes unconditionally.
import assert from "node:assert/strict";
import { after, describe, test } from "node:test";

import { PreconditionFailedError, Tensor } from "../optserve.js";
import { NO_SERVER, assertSameTensor, assertSameTree, client, uid } from "./helpers.js";

const CHANGES = {
  putParams: (c, id, cond) => c.putParams(id, { x: Tensor.from([0.5, 0.25, -1]) }, cond),
  configureSession: (c, id, cond) => c.configureSession(id, { max_staleness: 2 }, cond),
  addParamGroup: (c, id, cond) => c.addParamGroup(id, { params: { y: Tensor.from([1, 2]) }, lr: 0.01 }, cond),
  updateParamGroup: (c, id, cond) => c.updateParamGroup(id, 0, { lr: 0.02 }, cond),
  schedulerStep: (c, id, cond) => c.schedulerStep(id, cond),
};

describe("conditional changes", { skip: NO_SERVER }, () => {
  const c = client();
  const made = [];
  after(async () => {
    for (const id of made) await c.deleteSession(id).catch(() => {});
  });
  const spec = {
    optimizer: "SGD", options: { lr: 0.1, momentum: 0.9 }, params: { x: Tensor.from([1, -2, 3]) },
    scheduler: { name: "StepLR", options: { step_size: 1, gamma: 0.5 }, step_on: "manual" },
  };
  const twins = async (name) => {
    const a = uid(`cc-${name}-a`);
    const b = uid(`cc-${name}-b`);
    made.push(a, b);
    for (const id of [a, b]) await c.createSession({ ...spec, id });
    let k = 0;
    const both = async () => {
      k += 1;
      const names = Object.keys((await c.getSession(a)).params);
      const grads = Object.fromEntries(names.map((n, i) => [n, Tensor.from(n === "x" ? [k, -k / 2, 1 / k] : [i + k, -k])]));
      const [ra, rb] = [await c.step(a, grads), await c.step(b, grads)];
      for (const n of names) assertSameTensor(ra.params[n], rb.params[n], `step ${k}, ${n}`);
    };
    const same = async (what) => {
      assertSameTree(await c.exportState(a), await c.exportState(b), what);
      const [da, db] = [await c.getSession(a), await c.getSession(b)];
      assert.deepEqual([da.version, da.revision, da.lr, da.max_staleness], [db.version, db.revision, db.lr, db.max_staleness], what);
    };
    return { a, b, both, same };
  };

  for (const [name, change] of Object.entries(CHANGES)) {
    for (const which of ["baseVersion", "baseRevision"]) {
      test(`${name} with ${which}: 412 once the session moved on, applied when current`, async () => {
        const { a, b, both, same } = await twins(name);
        await both();
        const read = await c.getSession(a);
        await both();
        const err = await change(c, a, { [which]: which === "baseVersion" ? read.version : read.revision }).catch((e) => e);
        assert.ok(err instanceof PreconditionFailedError, String(err));
        assert.equal(err.status, 412);
        assert.equal(err.field, which === "baseVersion" ? "If-Match" : "base_revision");
        await same("nothing changed");
        const now = await c.getSession(a);
        await change(c, a, { [which]: which === "baseVersion" ? now.version : now.revision });
        await change(c, b, {});
        await same("the change applied");
        await both();
        await same("and the sessions step alike");
      });
    }
  }

  test("deleteSession: 412 once the session moved on, deleted when current", async () => {
    const { a, both } = await twins("delete");
    await both();
    const read = await c.getSession(a);
    await c.updateParamGroup(a, 0, { lr: 0.05 });
    const err = await c.deleteSession(a, { baseRevision: read.revision }).catch((e) => e);
    assert.ok(err instanceof PreconditionFailedError, String(err));
    assert.equal((await c.getSession(a)).revision, read.revision + 1);
    await c.deleteSession(a, { baseVersion: read.version, baseRevision: read.revision + 1 });
    const gone = await c.getSession(a).catch((e) => e);
    assert.equal(gone.status, 404);
    assert.throws(() => c.putParams(a, { x: Tensor.from([1]) }, { baseRevision: 1.5 }), TypeError);
  });

  test("reads with atVersion (If-Match): answered at that version, 412 at another", async () => {
    const { a, both } = await twins("reads");
    await both();
    await both();
    assert.equal((await c.getSession(a, { atVersion: 2 })).version, 2);
    const params = await c.getParams(a, { atVersion: 2 });
    assert.equal(params.version, 2);
    assertSameTensor(params.params.x, (await c.getParams(a)).params.x, "params at version 2");
    for (const format of ["json", "safetensors"]) {
      assertSameTree(await c.exportState(a, { format, atVersion: 2 }), await c.exportState(a, { format }), `state (${format})`);
    }
    const reads = [() => c.getSession(a, { atVersion: 1 }), () => c.getParams(a, { atVersion: 3 }),
      () => c.exportState(a, { atVersion: 1 })];
    for (const read of reads) {
      const err = await read().catch((e) => e);
      assert.ok(err instanceof PreconditionFailedError, String(err));
      assert.equal(err.status, 412);
      assert.equal(err.field, "If-Match");
      assert.equal(err.problem.current_version, 2);
    }
    assert.throws(() => c.getSession(a, { atVersion: -1 }), TypeError);
    await assert.rejects(() => c.exportState(a, { atVersion: "2" }), TypeError);
  });
});
