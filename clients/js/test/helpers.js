// Shared by the tests (node --test also loads this file on its own; it defines no tests).
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { randomBytes } from "node:crypto";

import { OptserveClient, Tensor } from "../optserve.js";

export const BASE_URL = process.env.OPTSERVE_BASE_URL;
/** Pass as the `skip` option of a describe(): these tests need a live server. */
export const NO_SERVER = BASE_URL ? false : "OPTSERVE_BASE_URL is not set (scripts/test-clients starts a server)";
/**
 * The API key of the server under test (OPTSERVE_API_KEY; scripts/test-clients starts its server
 * with one), sent by client() and by every client a test makes for BASE_URL; unset, none is sent
 * (a server without keys).
 */
export const API_KEY = process.env.OPTSERVE_API_KEY || undefined;
/** Pass as the `skip` option of a describe(): these tests need a live server that takes API keys. */
export const NO_KEYED_SERVER = NO_SERVER ||
  (API_KEY ? false : "OPTSERVE_API_KEY is not set (scripts/test-clients starts its server with a key and sets it)");

let refCache;
/**
 * The expected values (make_reference.py's output), computed at test time by the server's torch
 * on this machine, never committed (floats differ between CPUs). Read from the file that
 * OPTSERVE_REFERENCE names (scripts/test-clients writes it once per run), else generated now with
 * OPTSERVE_PYTHON (default: the repository's .venv/bin/python), which must be the server's torch.
 */
export function reference() {
  if (refCache) return refCache;
  const file = process.env.OPTSERVE_REFERENCE;
  let text;
  if (file) {
    text = readFileSync(file, "utf8");
  } else {
    const python = process.env.OPTSERVE_PYTHON || fileURLToPath(new URL("../../../.venv/bin/python", import.meta.url));
    const script = fileURLToPath(new URL("./make_reference.py", import.meta.url));
    try {
      text = execFileSync(python, [script], { encoding: "utf8", maxBuffer: 64 * 1024 * 1024, stdio: ["ignore", "pipe", "pipe"] });
    } catch (err) {
      throw new Error(
        `cannot compute the expected values: ${python} ${script} failed (${err.stderr?.trim() || err.message}); ` +
        "run scripts/bootstrap, or set OPTSERVE_PYTHON to the server's python or OPTSERVE_REFERENCE to a file it wrote",
      );
    }
  }
  refCache = JSON.parse(text);
  return refCache;
}

/** A client of the server under test, with its API key (if any); `opts` override both. */
export function client(opts = {}) {
  return new OptserveClient({ baseUrl: BASE_URL, apiKey: API_KEY, timeoutMs: 20000, ...opts });
}

/** A fresh session id, unique across parallel test files. */
export function uid(prefix = "js") {
  return `${prefix}-${randomBytes(6).toString("hex")}`;
}

/** A reference vector ({dtype, shape, data, bits}) as a Tensor (exact: data are the float values). */
export function refTensor(v) {
  const Arr = v.dtype === "float64" ? Float64Array : Float32Array;
  return new Tensor(v.dtype, v.shape, Arr.from(v.data));
}

function hexBits(t) {
  if (t.dtype === "float32") return Array.from(new Uint32Array(Float32Array.from(t.data).buffer), (b) => b.toString(16).padStart(8, "0"));
  if (t.dtype === "float64") return Array.from(new BigUint64Array(Float64Array.from(t.data).buffer), (b) => b.toString(16).padStart(16, "0"));
  throw new TypeError(t.dtype);
}

/** Bit-exact comparison of a Tensor with a reference vector (its hex bits). */
export function assertBits(actual, expected, what = "tensor") {
  assert.ok(actual instanceof Tensor, `${what} is a Tensor`);
  assert.equal(actual.dtype, expected.dtype, `${what} dtype`);
  assert.deepEqual(actual.shape, expected.shape, `${what} shape`);
  assert.deepEqual(hexBits(actual), expected.bits, `${what} bits (values ${Array.from(actual.data)} vs ${expected.data})`);
}

/** Bit-exact equality of two Tensors. */
export function assertSameTensor(a, b, what = "tensor") {
  assert.ok(a instanceof Tensor && b instanceof Tensor, `${what}: both Tensors`);
  assert.equal(a.dtype, b.dtype, `${what} dtype`);
  assert.deepEqual(a.shape, b.shape, `${what} shape`);
  assert.deepEqual(Array.from(a.toBytes()), Array.from(b.toBytes()), `${what}: ${Array.from(a.data)} vs ${Array.from(b.data)}`);
}

/** Deep equality of state trees, comparing Tensors bit for bit. */
export function assertSameTree(a, b, path = "state") {
  if (a instanceof Tensor || b instanceof Tensor) return assertSameTensor(a, b, path);
  if (Array.isArray(a)) {
    assert.ok(Array.isArray(b), `${path} is a list`);
    assert.equal(a.length, b.length, `${path} length`);
    a.forEach((v, i) => assertSameTree(v, b[i], `${path}.${i}`));
    return;
  }
  if (a && typeof a === "object") {
    assert.ok(b && typeof b === "object", `${path} is an object`);
    assert.deepEqual(Object.keys(a).sort(), Object.keys(b).sort(), `${path} keys`);
    for (const k of Object.keys(a)) assertSameTree(a[k], b[k], `${path}.${k}`);
    return;
  }
  assert.ok(Object.is(a, b), `${path}: ${a} vs ${b}`);
}
