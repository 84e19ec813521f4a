// A conditional export (exportStateIfChanged): the whole state, torch's bit for bit, with the
// state tag it was read with ("r<revision>.<token>"); asked again with that tag, a 304 (nothing
// downloaded) while nothing changed the session; the whole state again after an option PATCH
// (which leaves the version alone) and after a step; and after the session is deleted and made
// again under the same id (its revision counts from 0 again: the revision alone would match).
import assert from "node:assert/strict";
import { after, describe, test } from "node:test";

import { NO_SERVER, assertBits, assertSameTree, client, reference, refTensor, uid } from "./helpers.js";

describe("exportStateIfChanged", { skip: NO_SERVER }, () => {
  const c = client();
  const ref = reference(); // computed by this machine's torch
  const made = [];
  after(async () => {
    for (const id of made) await c.deleteSession(id).catch(() => {});
  });

  for (const format of ["json", "safetensors"]) {
    test(`Adam: 304 while unchanged, the whole state once changed (${format})`, async () => {
      const r = ref.adam;
      const id = uid("ifchanged");
      made.push(id);
      const params = Object.fromEntries(Object.entries(r.params0).map(([n, v]) => [n, refTensor(v)]));
      await c.createSession({ id, optimizer: r.optimizer, options: r.options, params });
      const grads = (s) => Object.fromEntries(Object.entries(s.grads).map(([n, v]) => [n, refTensor(v)]));
      const [last, ...first] = [r.steps.at(-1), ...r.steps.slice(0, -1)];
      for (const s of first) await c.step(id, grads(s), { returnParams: false });

      const read = await c.exportStateIfChanged(id, { format });
      assert.equal(read.notModified, undefined);
      assert.equal(read.version, first.length);
      assert.ok(Number.isSafeInteger(read.revision));
      assert.match(read.tag, new RegExp(`^"r${read.revision}\\.[0-9a-f]{16}"$`));
      assertSameTree(read.state, await c.exportState(id, { format }), "state");

      const again = await c.exportStateIfChanged(id, { format, tag: read.tag });
      assert.deepEqual(again, { version: read.version, step: read.step, revision: read.revision, tag: read.tag, notModified: true });

      // option changes (torch's lr halved, then back): the version stays, the revision moves,
      // the lr comes back as changed; a PATCH to the value the group has changes nothing (304)
      let { revision, tag } = read;
      for (const lr of [r.options.lr / 2, r.options.lr / 2, r.options.lr]) {
        await c.updateParamGroup(id, 0, { lr });
        const patched = await c.exportStateIfChanged(id, { format, tag });
        assert.equal(patched.version, read.version);
        if (patched.notModified) {
          assert.equal(patched.revision, revision);
          assert.equal(patched.tag, tag);
          continue;
        }
        assert.ok(patched.revision > revision);
        assert.notEqual(patched.tag, tag);
        assert.equal(patched.state.param_groups[0].lr, lr);
        assertSameTree(patched.state.state, read.state.state, "state after a PATCH");
        ({ revision, tag } = patched);
      }
      assert.equal(revision, read.revision + 2);

      // the last step: the whole state, torch's after all of them
      await c.step(id, grads(last), { returnParams: false });
      const stepped = await c.exportStateIfChanged(id, { format, tag });
      assert.equal(stepped.notModified, undefined);
      assert.equal(stepped.version, r.steps.length);
      const assertFinal = (got, what) => {
        for (const [i, n] of Object.keys(r.params0).entries()) {
          const st = got.state.state[String(i)];
          assert.deepEqual(Object.keys(st).sort(), Object.keys(r.final_state[n]).sort(), `${what}: state keys of ${n}`);
          for (const [k, v] of Object.entries(r.final_state[n])) assertBits(st[k], v, `${what}: state ${n}.${k}`);
        }
      };
      assertFinal(stepped, "stepped");

      // deleted and made again under the same id, stepped as often (the same revision: a
      // revision alone would name the old session): the old tag reads the new session whole
      const stepsSinceCreate = r.steps.length;
      await c.deleteSession(id);
      const zeros = Object.fromEntries(Object.entries(r.params0).map(([n, v]) => [n, refTensor({ ...v, data: v.data.map(() => 0) })]));
      await c.createSession({ id, optimizer: r.optimizer, options: r.options, params: zeros });
      for (let i = 0; i < stepsSinceCreate; i++) await c.step(id, grads(r.steps[0]), { returnParams: false });
      await c.updateParamGroup(id, 0, { lr: r.options.lr / 2 });
      await c.updateParamGroup(id, 0, { lr: r.options.lr });
      const remade = await c.exportStateIfChanged(id, { format, tag: stepped.tag });
      assert.equal(remade.revision, stepped.revision);
      assert.equal(remade.notModified, undefined);
      assert.notEqual(remade.tag, stepped.tag);
      assertSameTree(remade.state, await c.exportState(id, { format }), "the state made again");
      assert.throws(() => assertFinal(remade, "made again"), assert.AssertionError);
      // (another token at the same revision: a whole answer too; the revision alone, the form
      // sent before, is refused here: the server would answer it whole)
      const bare = await c.exportStateIfChanged(id, { format, tag: `"r${remade.revision}.0"` });
      assert.equal(bare.notModified, undefined);
      await assert.rejects(c.exportStateIfChanged(id, { tag: -1 }), TypeError);
      await assert.rejects(c.exportStateIfChanged(id, { tag: `"r${remade.revision}"` }), TypeError);
      await assert.rejects(c.exportStateIfChanged(id, { revision: remade.revision }), TypeError);
    });
  }
});
