// A conditional export (exportStateIfChanged): the whole state, torch's bit for bit, with the
// revision it was read at; asked again with that revision, a 304 (nothing downloaded) while
// nothing changed the session; the whole state again after an option PATCH (which leaves the
// version alone) and after a step.
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
      assertSameTree(read.state, await c.exportState(id, { format }), "state");

      const again = await c.exportStateIfChanged(id, { format, revision: read.revision });
      assert.deepEqual(again, { version: read.version, step: read.step, revision: read.revision, notModified: true });

      // option changes (torch's lr halved, then back): the version stays, the revision moves,
      // the lr comes back as changed; a PATCH to the value the group has changes nothing (304)
      let revision = read.revision;
      for (const lr of [r.options.lr / 2, r.options.lr / 2, r.options.lr]) {
        await c.updateParamGroup(id, 0, { lr });
        const patched = await c.exportStateIfChanged(id, { format, revision });
        assert.equal(patched.version, read.version);
        if (patched.notModified) {
          assert.equal(patched.revision, revision);
          continue;
        }
        assert.ok(patched.revision > revision);
        assert.equal(patched.state.param_groups[0].lr, lr);
        assertSameTree(patched.state.state, read.state.state, "state after a PATCH");
        revision = patched.revision;
      }
      assert.equal(revision, read.revision + 2);

      // the last step: the whole state, torch's after all of them
      await c.step(id, grads(last), { returnParams: false });
      const stepped = await c.exportStateIfChanged(id, { format, revision });
      assert.equal(stepped.notModified, undefined);
      assert.equal(stepped.version, r.steps.length);
      for (const [i, n] of Object.keys(r.params0).entries()) {
        const st = stepped.state.state[String(i)];
        assert.deepEqual(Object.keys(st).sort(), Object.keys(r.final_state[n]).sort(), `state keys of ${n}`);
        for (const [k, v] of Object.entries(r.final_state[n])) assertBits(st[k], v, `state ${n}.${k}`);
      }
      await assert.rejects(c.exportStateIfChanged(id, { revision: -1 }), TypeError);
    });
  }
});
