// Wire codecs on their own (no server): half-precision bits, JSON tensors, base64, safetensors.
import assert from "node:assert/strict";
import { test } from "node:test";

import {
  Tensor, bfloat16ToNumber, decodeJsonTensor, encodeJsonTensor, float16ToNumber, numberToBfloat16,
  numberToFloat16, parseMetadata, readSafetensors, stringify, treeFromJson, treeToJson, writeSafetensors,
} from "../optserve.js";
import { assertSameTensor, assertSameTree, reference } from "./helpers.js";

test("float16 bits: exact values, rounding to nearest even, specials", () => {
  const cases = [
    [0, 0x0000], [-0, 0x8000], [1, 0x3c00], [-2, 0xc000], [0.5, 0x3800], [65504, 0x7bff],
    [65519.99, 0x7bff], [65520, 0x7c00], [1e6, 0x7c00], [Infinity, 0x7c00], [-Infinity, 0xfc00],
    [2 ** -24, 0x0001], [2 ** -25, 0x0000], [3 * 2 ** -25, 0x0002], [2 ** -14, 0x0400],
    [1 + 2 ** -11, 0x3c00], [1 + 3 * 2 ** -11, 0x3c02], [0.1, 0x2e66], [1 / 3, 0x3555],
  ];
  for (const [x, bits] of cases) assert.equal(numberToFloat16(x), bits, `f16(${x})`);
  assert.equal(numberToFloat16(NaN) & 0x7c00, 0x7c00);
  assert.ok(Number.isNaN(float16ToNumber(0x7e00)));
  for (let h = 0; h < 0x10000; h++) {
    const x = float16ToNumber(h);
    if (!Number.isNaN(x)) assert.equal(numberToFloat16(x), h, `round trip of ${h.toString(16)}`);
  }
});

test("doubles between two half values round as torch rounds them (through float32)", () => {
  const ref = reference().half_rounding; // torch.tensor(values, dtype=...) on this machine
  ref.values.forEach((x, i) => {
    assert.equal(numberToFloat16(x), ref.float16[i], `float16 of ${x}`);
    assert.equal(numberToBfloat16(x), ref.bfloat16[i], `bfloat16 of ${x}`);
  });
  assert.deepEqual(Array.from(Tensor.from(ref.values, { dtype: "float16" }).data), ref.float16);
});

test("bfloat16 bits", () => {
  assert.equal(numberToBfloat16(1), 0x3f80);
  assert.equal(numberToBfloat16(-2.5), 0xc020);
  assert.equal(numberToBfloat16(1 + 2 ** -8), 0x3f80); // tie: to even
  assert.equal(numberToBfloat16(1 + 3 * 2 ** -8), 0x3f82);
  assert.equal(numberToBfloat16(Infinity), 0x7f80);
  assert.ok(Number.isNaN(bfloat16ToNumber(numberToBfloat16(NaN))));
  assert.equal(bfloat16ToNumber(0x4049), 3.140625);
});

test("JSON tensors: data with non-finite strings, b64, every dtype", () => {
  const t = new Tensor("float32", [2, 2], Float32Array.of(1.5, NaN, Infinity, -Infinity));
  const enc = encodeJsonTensor(t);
  assert.deepEqual(enc, { dtype: "float32", shape: [2, 2], data: [1.5, "NaN", "Infinity", "-Infinity"] });
  assertSameTensor(decodeJsonTensor(JSON.parse(JSON.stringify(enc))), t);
  const b = encodeJsonTensor(t, { b64: true });
  assert.equal(b.b64, "AADAPwAAwH8AAIB/AACA/w==");
  assertSameTensor(decodeJsonTensor(b), t);
  const samples = {
    float16: Tensor.from([1, -0.5, 65504], { dtype: "float16" }),
    bfloat16: Tensor.from([1, -0.5, 3.140625], { dtype: "bfloat16" }),
    float64: Tensor.from([0.1, -1e300, 5e-324], { dtype: "float64" }),
    int8: Tensor.from([-128, 0, 127], { dtype: "int8" }),
    int16: Tensor.from([-32768, 1, 32767], { dtype: "int16" }),
    int32: Tensor.from([-(2 ** 31), 1, 2 ** 31 - 1], { dtype: "int32" }),
    int64: new Tensor("int64", [3], BigInt64Array.of(-(2n ** 63n), 1n, 2n ** 62n + 1n)),
    uint8: Tensor.from([0, 1, 255], { dtype: "uint8" }),
    bool: Tensor.from([true, false, true], { dtype: "bool" }),
  };
  for (const [dtype, s] of Object.entries(samples)) {
    assertSameTensor(decodeJsonTensor(encodeJsonTensor(s, { b64: true })), s, `${dtype} b64`);
    if (dtype !== "int64") assertSameTensor(decodeJsonTensor(JSON.parse(stringify(encodeJsonTensor(s)))), s, `${dtype} data`);
  }
  // int64 beyond 2^53 is written exactly as bare JSON integers
  assert.equal(stringify(encodeJsonTensor(samples.int64)),
    '{"dtype":"int64","shape":[3],"data":[-9223372036854775808,1,4611686018427387905]}');
  assert.deepEqual(encodeJsonTensor(samples.bool).data, [true, false, true]);
  assert.deepEqual(samples.float16.toArray(), [1, -0.5, 65504]);
  const scalar = Tensor.scalar(3, "float64");
  assert.deepEqual(scalar.shape, []);
  assert.equal(scalar.item(), 3);
  assert.throws(() => new Tensor("float32", [3], Float32Array.of(1)), RangeError);
  assert.throws(() => new Tensor("float32", [1], Float64Array.of(1)), TypeError);
  assert.throws(() => decodeJsonTensor({ dtype: "float32", shape: [2], b64: "AACAPw==" }), RangeError);
});

test("safetensors: write, read back, metadata, alignment, little-endian header", () => {
  const tensors = {
    "a.small": Tensor.from([1, 2, 3], { dtype: "uint8" }),
    w: new Tensor("float32", [2, 2], Float32Array.of(1, -2, 3.5, NaN)),
    d: Tensor.from([0.1], { dtype: "float64", shape: [] }),
    h: Tensor.from([0.5, 2], { dtype: "float16" }),
    i: new Tensor("int64", [1], BigInt64Array.of(-5n)),
    e: new Tensor("float32", [0, 3], new Float32Array(0)),
  };
  const buf = writeSafetensors(tensors, { version: 3, lr: [0.1, 0.01], name: "Adam" });
  const n = Number(new DataView(buf.buffer).getBigUint64(0, true));
  assert.equal((8 + n) % 8, 0, "data start is 8-byte aligned");
  const header = JSON.parse(new TextDecoder().decode(buf.subarray(8, 8 + n)));
  assert.deepEqual(header.__metadata__, { version: "3", lr: "[0.1,0.01]", name: "Adam" });
  assert.equal(header.w.dtype, "F32");
  assert.equal(header.h.dtype, "F16");
  for (const [name, info] of Object.entries(header)) {
    if (name !== "__metadata__") assert.equal(info.data_offsets[0] % { F64: 8, I64: 8, F32: 4, F16: 2, U8: 1 }[info.dtype], 0);
  }
  const back = readSafetensors(buf);
  assert.deepEqual(Object.keys(back.tensors).sort(), Object.keys(tensors).sort());
  for (const k of Object.keys(tensors)) assertSameTensor(back.tensors[k], tensors[k], k);
  assert.deepEqual(parseMetadata(back.metadata), { version: 3, lr: [0.1, 0.01], name: "Adam" });
  assert.throws(() => readSafetensors(buf.subarray(0, buf.length - 1)), RangeError);
});

/** One tensor of every dtype, of odd lengths (so that a misaligned copy would show). */
function everyDtype() {
  return {
    f16: Tensor.from([1, -0.5, 65504], { dtype: "float16" }),
    bf16: Tensor.from([1, -0.5, 3.140625], { dtype: "bfloat16" }),
    f32: new Tensor("float32", [3], Float32Array.of(1.5, NaN, -0)),
    f64: Tensor.from([0.1, -1e300, 5e-324], { dtype: "float64" }),
    i8: Tensor.from([-128, 0, 127], { dtype: "int8" }),
    i16: Tensor.from([-32768, 1, 32767], { dtype: "int16" }),
    i32: Tensor.from([-(2 ** 31), 1, 2 ** 31 - 1], { dtype: "int32" }),
    i64: new Tensor("int64", [3], BigInt64Array.of(-(2n ** 63n), 1n, 2n ** 62n + 1n)),
    u8: Tensor.from([0, 1, 255], { dtype: "uint8" }),
    b: Tensor.from([true, false, true], { dtype: "bool" }),
    empty: new Tensor("float64", [0, 2], new Float64Array(0)),
  };
}

test("safetensors: tensors are written straight into the file (no intermediate copy) and read as views of it", () => {
  const tensors = everyDtype();
  const toBytes = Tensor.prototype.toBytes;
  Tensor.prototype.toBytes = () => assert.fail("writeSafetensors copied a tensor through toBytes()");
  let buf;
  try {
    buf = writeSafetensors(tensors, { k: "v" });
  } finally {
    Tensor.prototype.toBytes = toBytes;
  }
  const back = readSafetensors(buf);
  for (const [k, t] of Object.entries(tensors)) {
    assertSameTensor(back.tensors[k], t, k);
    // every offset is aligned to its itemsize: a view of the file's bytes, not a copy
    assert.equal(back.tensors[k].data.buffer, buf.buffer, `${k} views the file`);
  }
  // an ArrayBuffer is read in place too
  const fromAb = readSafetensors(buf.buffer);
  assert.equal(fromAb.tensors.f64.data.buffer, buf.buffer);
  assertSameTensor(fromAb.tensors.f64, tensors.f64);
});

test("safetensors at a misaligned offset (or with an unpadded header) are copied where a view cannot be", () => {
  const tensors = everyDtype();
  const file = writeSafetensors(tensors);
  for (const shift of [1, 2, 3, 4, 5, 6, 7]) {
    const big = new Uint8Array(file.length + shift);
    big.set(file, shift);
    const back = readSafetensors(big.subarray(shift));
    for (const [k, t] of Object.entries(tensors)) {
      const got = back.tensors[k];
      assertSameTensor(got, t, `${k} at +${shift}`);
      assert.equal(got.data.byteOffset % t.itemsize, 0, `${k} at +${shift}: aligned`);
      if (t.itemsize === 1 || shift % t.itemsize === 0) assert.equal(got.data.buffer, big.buffer, `${k} at +${shift}: a view`);
      else assert.notEqual(got.data.buffer, big.buffer, `${k} at +${shift}: a copy`);
    }
  }
  // a header another writer did not pad to 8 bytes: data start at 8 + 13
  const header = JSON.stringify({ x: { dtype: "F32", shape: [2], data_offsets: [0, 8] } }).padEnd(13 + 56, " ");
  const headerBytes = new TextEncoder().encode(header);
  assert.equal((8 + headerBytes.length) % 4, 1);
  const raw = new Uint8Array(8 + headerBytes.length + 8);
  new DataView(raw.buffer).setBigUint64(0, BigInt(headerBytes.length), true);
  raw.set(headerBytes, 8);
  raw.set(new Uint8Array(Float32Array.of(2.5, -1).buffer), 8 + headerBytes.length);
  assertSameTensor(readSafetensors(raw).tensors.x, Tensor.from([2.5, -1]));
});

test("b64 JSON tensors decode to the sent values, every dtype", () => {
  for (const [k, t] of Object.entries(everyDtype())) {
    assertSameTensor(decodeJsonTensor(JSON.parse(JSON.stringify(encodeJsonTensor(t, { b64: true })))), t, k);
  }
});

test("state trees: tensors, $float tags, $tensor references", () => {
  const tree = {
    state: { 0: { step: Tensor.scalar(2), exp_avg: Tensor.from([1, 2]) } },
    param_groups: [{ lr: 0.1, eps: Infinity, max: -Infinity, x: NaN, params: [0] }],
  };
  const json = treeToJson(tree);
  assert.deepEqual(json.param_groups[0].eps, { $float: "inf" });
  assert.deepEqual(json.param_groups[0].x, { $float: "nan" });
  assertSameTree(treeFromJson(JSON.parse(JSON.stringify(json))), tree);
  assertSameTree(treeFromJson(treeToJson(tree, { b64: true })), tree);
});
