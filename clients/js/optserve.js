// optserve JavaScript client: torch.optim as an HTTP service.
// A dependency-free ES module for Node 18+ and browsers, built on fetch.
// Wire details: docs/protocol.md (JSON tensors, safetensors bodies, problem+json errors).

// ---------------------------------------------------------------------------------- dtypes

/** dtype name -> {itemsize, array constructor, safetensors name}. */
export const DTYPES = Object.freeze({
  float16: { itemsize: 2, array: Uint16Array, st: "F16" }, // raw IEEE half bits
  bfloat16: { itemsize: 2, array: Uint16Array, st: "BF16" }, // raw bfloat16 bits
  float32: { itemsize: 4, array: Float32Array, st: "F32" },
  float64: { itemsize: 8, array: Float64Array, st: "F64" },
  int8: { itemsize: 1, array: Int8Array, st: "I8" },
  int16: { itemsize: 2, array: Int16Array, st: "I16" },
  int32: { itemsize: 4, array: Int32Array, st: "I32" },
  int64: { itemsize: 8, array: BigInt64Array, st: "I64" },
  uint8: { itemsize: 1, array: Uint8Array, st: "U8" },
  bool: { itemsize: 1, array: Uint8Array, st: "BOOL" }, // 0 / 1
});

const FROM_ST = Object.freeze(
  Object.fromEntries(Object.entries(DTYPES).map(([name, d]) => [d.st, name])),
);
const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

function dtypeInfo(dtype) {
  const info = Object.prototype.hasOwnProperty.call(DTYPES, dtype) ? DTYPES[dtype] : undefined;
  if (!info) throw new TypeError(`unknown dtype ${JSON.stringify(dtype)}; one of ${Object.keys(DTYPES).join(", ")}`);
  return info;
}

// ------------------------------------------------------------------ float16 / bfloat16 bits

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

/** IEEE half bits (0..65535) to a number. */
export function float16ToNumber(h) {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const frac = h & 0x3ff;
  if (exp === 0) return sign * frac * 2 ** -24;
  if (exp === 0x1f) return frac ? NaN : sign * Infinity;
  return sign * (1 + frac / 1024) * 2 ** (exp - 15);
}

/**
 * A number to IEEE half bits, rounding to nearest even as torch does: through float32 (torch
 * makes a half of a Python float as float -> half, so a double just past a tie between two
 * halves rounds as the tie does once float32 has dropped what makes it pass).
 */
export function numberToFloat16(x) {
  if (Number.isNaN(x)) return 0x7e00;
  const sign = x < 0 || Object.is(x, -0) ? 0x8000 : 0;
  let a = Math.abs(Math.fround(x));
  if (a === Infinity) return sign | 0x7c00;
  if (a >= 65520) return sign | 0x7c00; // rounds past the largest half (65504)
  if (a < 2 ** -14) {
    // subnormal: units of 2^-24, round half to even
    const q = a / 2 ** -24;
    let n = Math.floor(q);
    const r = q - n;
    if (r > 0.5 || (r === 0.5 && n % 2 === 1)) n += 1;
    return sign | n; // n === 1024 lands exactly on the smallest normal's bits
  }
  let e = Math.floor(Math.log2(a));
  if (2 ** e > a) e -= 1; // guard log2 rounding
  if (2 ** (e + 1) <= a) e += 1;
  const q = (a / 2 ** e - 1) * 1024; // exact: a has at most 24 significant bits
  let m = Math.floor(q);
  const r = q - m;
  if (r > 0.5 || (r === 0.5 && m % 2 === 1)) m += 1;
  if (m === 1024) { m = 0; e += 1; }
  if (e > 15) return sign | 0x7c00;
  return sign | ((e + 15) << 10) | m;
}

/** bfloat16 bits to a number. */
export function bfloat16ToNumber(h) {
  u32[0] = (h & 0xffff) << 16;
  return f32[0];
}

/** A number to bfloat16 bits, rounding (via float32) to nearest even. */
export function numberToBfloat16(x) {
  f32[0] = x;
  const bitsF = u32[0];
  if ((bitsF & 0x7f800000) === 0x7f800000 && (bitsF & 0x7fffff)) return ((bitsF >>> 16) | 0x40) & 0xffff;
  const rounded = bitsF + 0x7fff + ((bitsF >>> 16) & 1);
  return (rounded >>> 16) & 0xffff;
}

// ------------------------------------------------------------------------------ Tensor

function prod(shape) {
  return shape.reduce((a, b) => a * b, 1);
}

/**
 * An options object checked against the names a call takes: a misspelt one
 * (`{baseVerison: 3}` on importState: an unconditional import) throws a TypeError naming it,
 * where a destructuring would drop it without a word.
 */
function optionsOf(given, names, where) {
  if (given === undefined || given === null) return {};
  if (typeof given !== "object" || Array.isArray(given)) {
    throw new TypeError(`${where}: options must be an object, got ${Array.isArray(given) ? "an array" : typeof given}`);
  }
  for (const key of Object.keys(given)) {
    if (!names.includes(key)) {
      throw new TypeError(`${where}: unknown option ${JSON.stringify(key)} (it takes ${names.join(", ")})`);
    }
  }
  return given;
}

/**
 * A tensor on the wire: dtype name, shape and a flat row-major TypedArray.
 * float16/bfloat16 data are Uint16Array raw bits, int64 is BigInt64Array, bool is Uint8Array.
 */
export class Tensor {
  constructor(dtype, shape, data) {
    const info = dtypeInfo(dtype);
    if (!Array.isArray(shape) || !shape.every((d) => Number.isInteger(d) && d >= 0)) {
      throw new TypeError(`shape must be a list of non-negative integers, got ${JSON.stringify(shape)}`);
    }
    if (!(data instanceof info.array)) {
      throw new TypeError(`${dtype} data must be a ${info.array.name}, got ${data?.constructor?.name}`);
    }
    if (data.length !== prod(shape)) {
      throw new RangeError(`data has ${data.length} values but shape ${JSON.stringify(shape)} holds ${prod(shape)}`);
    }
    this.dtype = dtype;
    this.shape = shape.slice();
    this.data = data;
  }

  /** Build from plain numbers (or bigints / booleans), converting to the dtype's storage. */
  static from(values, callOptions = {}) {
    let { dtype = "float32", shape } = optionsOf(callOptions, ["dtype", "shape"], "Tensor.from");
    const info = dtypeInfo(dtype);
    const flat = ArrayBuffer.isView(values) ? Array.from(values) : flatten(values);
    const shp = shape ?? (ArrayBuffer.isView(values) ? [values.length] : inferShape(values));
    let data;
    if (dtype === "float16") data = Uint16Array.from(flat, (v) => numberToFloat16(Number(v)));
    else if (dtype === "bfloat16") data = Uint16Array.from(flat, (v) => numberToBfloat16(Number(v)));
    else if (dtype === "int64") data = BigInt64Array.from(flat, (v) => BigInt(v));
    else if (dtype === "bool") data = Uint8Array.from(flat, (v) => (v ? 1 : 0));
    else data = info.array.from(flat, (v) => Number(v));
    return new Tensor(dtype, shp, data);
  }

  /** A 0-d (scalar) tensor. */
  static scalar(value, dtype = "float32") {
    return Tensor.from([value], { dtype, shape: [] });
  }

  get numel() {
    return this.data.length;
  }

  get itemsize() {
    return DTYPES[this.dtype].itemsize;
  }

  /** Values as plain numbers (float16/bfloat16 decoded; int64 as BigInt; bool as boolean). */
  toArray() {
    if (this.dtype === "float16") return Array.from(this.data, float16ToNumber);
    if (this.dtype === "bfloat16") return Array.from(this.data, bfloat16ToNumber);
    if (this.dtype === "bool") return Array.from(this.data, (v) => v !== 0);
    return Array.from(this.data);
  }

  /** The single value of a one-element tensor. */
  item() {
    if (this.numel !== 1) throw new RangeError(`item() needs one element, tensor has ${this.numel}`);
    return this.toArray()[0];
  }

  /** Raw little-endian bytes (a fresh copy). */
  toBytes() {
    return typedToBytes(this.data);
  }

  /** A tensor from raw little-endian bytes. */
  static fromBytes(dtype, shape, bytes) {
    return new Tensor(dtype, shape, bytesToTyped(dtype, bytes));
  }

  /** Bitwise equality (NaNs with the same bits are equal; -0 differs from 0). */
  equals(other) {
    if (!(other instanceof Tensor) || other.dtype !== this.dtype) return false;
    if (other.shape.length !== this.shape.length || other.shape.some((d, i) => d !== this.shape[i])) return false;
    const a = this.toBytes();
    const b = other.toBytes();
    return a.length === b.length && a.every((v, i) => v === b[i]);
  }
}

function flatten(values) {
  if (!Array.isArray(values)) return [values];
  return values.flat(Infinity);
}

function inferShape(values) {
  const shape = [];
  let v = values;
  while (Array.isArray(v)) {
    shape.push(v.length);
    v = v[0];
  }
  return shape;
}

/** Convenience: a value given where a tensor is expected (Tensor, Float32Array, Float64Array, numbers). */
export function asTensor(x) {
  if (x instanceof Tensor) return x;
  if (x instanceof Float32Array) return new Tensor("float32", [x.length], x);
  if (x instanceof Float64Array) return new Tensor("float64", [x.length], x);
  if (typeof x === "number" || Array.isArray(x)) return Tensor.from(x, { shape: typeof x === "number" ? [] : undefined });
  if (x && typeof x === "object" && "dtype" in x && "shape" in x && ("data" in x || "b64" in x)) {
    return ArrayBuffer.isView(x.data) ? new Tensor(x.dtype, x.shape, x.data) : decodeJsonTensor(x);
  }
  throw new TypeError(`not a tensor: ${Object.prototype.toString.call(x)}`);
}

function tensorMap(obj) {
  const out = {};
  for (const [name, t] of Object.entries(obj ?? {})) out[name] = t instanceof SparseRows ? t : asTensor(t);
  return out;
}

/**
 * Some rows of a parameter (an embedding table): `values` holds one row per entry of `indices`.
 * As a gradient it is row-sparse (duplicate rows are summed by the optimizer, as torch's
 * embedding backward leaves them); row pulls and `returnParams: "touched"` answer with these.
 * indices: an int64 Tensor, a BigInt64Array or an array of integers; values: a Tensor [n, ...]
 * (or what asTensor takes); shape: the parameter's dense shape (optional in a gradient).
 */
export class SparseRows {
  constructor(indices, values, shape) {
    this.indices = indices instanceof Tensor ? indices : Tensor.from(Array.from(indices, (v) => BigInt(v)), { dtype: "int64" });
    if (this.indices.dtype !== "int64" || this.indices.shape.length !== 1) throw new TypeError("indices must be 1-D int64");
    this.values = asTensor(values);
    if (this.values.shape.length < 1 || this.values.shape[0] !== this.indices.numel) {
      throw new RangeError(`${this.indices.numel} indices need values of shape [${this.indices.numel}, ...], got ${JSON.stringify(this.values.shape)}`);
    }
    this.shape = shape ? shape.slice() : undefined;
  }

  get dtype() {
    return this.values.dtype;
  }

  /** The row indices as plain numbers. */
  rows() {
    return Array.from(this.indices.data, Number);
  }

  toJSON() {
    return encodeSparseRows(this);
  }
}

function encodeSparseRows(s, { b64 = false } = {}) {
  const out = { dtype: s.values.dtype };
  if (s.shape) out.shape = s.shape.slice();
  out.indices = s.rows();
  out.values = encodeJsonTensor(s.values, { b64 });
  return out;
}

/** A JSON tensor or JSON sparse rows object ({indices, values, shape}) to a Tensor or SparseRows. */
function decodeAnyTensor(obj) {
  if (obj && typeof obj === "object" && "indices" in obj && "values" in obj) {
    const idx = Array.isArray(obj.indices) ? obj.indices : decodeJsonTensor(obj.indices).toArray();
    return new SparseRows(idx, decodeJsonTensor(obj.values), obj.shape);
  }
  return decodeJsonTensor(obj);
}

/** safetensors entries with `<name>.indices` (int64) + `<name>.values` merged into SparseRows. */
function pairSparse(tensors, shapes = {}) {
  const out = {};
  const taken = new Set();
  for (const [key, t] of Object.entries(tensors)) {
    if (key.endsWith(".indices") && t.dtype === "int64") {
      const name = key.slice(0, -".indices".length);
      const values = tensors[`${name}.values`];
      if (values) {
        out[name] = new SparseRows(t, values, shapes[name]);
        taken.add(key).add(`${name}.values`);
      }
    }
  }
  for (const [key, t] of Object.entries(tensors)) if (!taken.has(key)) out[key] = t;
  return out;
}

/** Tensors for a safetensors body: SparseRows as their `.indices` / `.values` pair. */
function flattenSparse(map) {
  const out = {};
  for (const [name, t] of Object.entries(map)) {
    if (t instanceof SparseRows) {
      out[`${name}.indices`] = t.indices;
      out[`${name}.values`] = t.values;
    } else {
      out[name] = t;
    }
  }
  return out;
}

// --------------------------------------------------------------------- bytes and base64

function typedToBytes(typed) {
  const n = typed.BYTES_PER_ELEMENT;
  const out = new Uint8Array(typed.byteLength);
  out.set(new Uint8Array(typed.buffer, typed.byteOffset, typed.byteLength));
  if (!LITTLE_ENDIAN && n > 1) swapInPlace(out, n);
  return out;
}

function bytesToTyped(dtype, bytes) {
  const info = dtypeInfo(dtype);
  if (bytes.byteLength % info.itemsize !== 0) {
    throw new RangeError(`${bytes.byteLength} bytes is not a whole number of ${dtype} values`);
  }
  const copy = new Uint8Array(bytes.byteLength);
  copy.set(toBytes(bytes));
  if (!LITTLE_ENDIAN && info.itemsize > 1) swapInPlace(copy, info.itemsize);
  return new info.array(copy.buffer, 0, copy.byteLength / info.itemsize);
}

/** Typed values over `bytes` itself where the byte order and alignment allow (no copy), else a copy. */
function bytesToTypedView(dtype, bytes) {
  const info = dtypeInfo(dtype);
  if (LITTLE_ENDIAN && bytes.byteOffset % info.itemsize === 0 && bytes.byteLength % info.itemsize === 0) {
    return new info.array(bytes.buffer, bytes.byteOffset, bytes.byteLength / info.itemsize);
  }
  return bytesToTyped(dtype, bytes);
}

function swapInPlace(bytes, n) {
  for (let i = 0; i < bytes.length; i += n) bytes.subarray(i, i + n).reverse();
}

const hasBuffer = typeof globalThis.Buffer === "function";

export function bytesToBase64(bytes) {
  if (hasBuffer) return globalThis.Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString("base64");
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

export function base64ToBytes(text) {
  if (typeof text !== "string" || !/^[A-Za-z0-9+/]*={0,2}$/.test(text) || text.length % 4 !== 0) {
    throw new TypeError("b64 is not valid base64");
  }
  if (hasBuffer) {
    // a large one has memory of its own: viewed, not copied; a small one is a slice of Node's
    // shared pool: copied (cheap), so no tensor holds or exposes the pool's buffer
    const b = globalThis.Buffer.from(text, "base64");
    return b.byteLength === b.buffer.byteLength ? new Uint8Array(b.buffer, 0, b.byteLength) : new Uint8Array(b);
  }
  const s = atob(text);
  const out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
  return out;
}

// ------------------------------------------------------------------------- JSON tensors

const NONFINITE_IN = { NaN: NaN, Infinity: Infinity, "-Infinity": -Infinity };
// strings starting with RAW_MARK are written by stringify() as bare JSON (exact int64, -0.0)
const RAW_MARK = "\u0000optserve-raw:";

function jsonNumber(x) {
  if (Object.is(x, -0)) return RAW_MARK + "-0.0"; // JSON.stringify(-0) would write 0
  if (Number.isFinite(x)) return x;
  return Number.isNaN(x) ? "NaN" : x > 0 ? "Infinity" : "-Infinity";
}

/** A Tensor to a JSON tensor object: `data` (non-finite as "NaN"/"Infinity"/"-Infinity") or `b64`. */
export function encodeJsonTensor(t, callOptions = {}) {
  let { b64 = false } = optionsOf(callOptions, ["b64"], "encodeJsonTensor");
  t = asTensor(t);
  const out = { dtype: t.dtype, shape: t.shape.slice() };
  if (b64) {
    out.b64 = bytesToBase64(t.toBytes());
  } else if (t.dtype === "int64") {
    // exact: serialized as bare integers by stringify() below
    out.data = Array.from(t.data, (v) => (Number.isSafeInteger(Number(v)) ? Number(v) : RAW_MARK + v.toString()));
  } else if (t.dtype === "bool") {
    out.data = Array.from(t.data, (v) => v !== 0);
  } else {
    out.data = t.toArray().map(jsonNumber);
  }
  return out;
}

/** A JSON tensor object ({dtype, shape, data | b64}) to a Tensor. */
export function decodeJsonTensor(obj) {
  if (!isJsonTensor(obj)) throw new TypeError("not a JSON tensor {dtype, shape, data | b64}");
  const { dtype, shape } = obj;
  const info = dtypeInfo(dtype);
  if ("b64" in obj) {
    const bytes = base64ToBytes(obj.b64);
    if (bytes.length !== prod(shape) * info.itemsize) {
      throw new RangeError(`b64 holds ${bytes.length} bytes, shape ${JSON.stringify(shape)} of ${dtype} needs ${prod(shape) * info.itemsize}`);
    }
    return new Tensor(dtype, shape, bytesToTypedView(dtype, bytes)); // fresh bytes: viewed where aligned
  }
  const values = obj.data.map((v) => (typeof v === "string" && v in NONFINITE_IN ? NONFINITE_IN[v] : v));
  // int64 beyond 2^53 loses precision in JSON.parse; ask for encoding "b64" when that matters
  return Tensor.from(values, { dtype, shape });
}

export function isJsonTensor(obj) {
  if (!obj || typeof obj !== "object" || Array.isArray(obj) || obj instanceof Tensor) return false;
  const keys = Object.keys(obj);
  return "dtype" in obj && "shape" in obj && ("data" in obj) !== ("b64" in obj) &&
    keys.every((k) => k === "dtype" || k === "shape" || k === "data" || k === "b64");
}

/**
 * JSON.stringify for request bodies: BigInts and the int64 / -0.0 values marked by
 * encodeJsonTensor become bare JSON numbers (plain JSON.stringify would fail or lose them).
 */
export function stringify(value) {
  const text = JSON.stringify(value, (_k, v) => (typeof v === "bigint" ? RAW_MARK + v.toString() : v));
  return text.replace(/"\\u0000optserve-raw:(-?[0-9][0-9.]*)"/g, "$1");
}

// ------------------------------------------------------------------- state-dict trees

/** A tree (state dict) with Tensors to plain JSON (tensors as JSON tensors, non-finite floats tagged). */
export function treeToJson(obj, callOptions = {}) {
  let { b64 = false } = optionsOf(callOptions, ["b64"], "treeToJson");
  return mapTree(obj, (t) => encodeJsonTensor(t, { b64 }));
}

/** Plain JSON (from the server) back to a tree with Tensors and non-finite numbers. */
export function treeFromJson(obj, tensors) {
  if (Array.isArray(obj)) return obj.map((v) => treeFromJson(v, tensors));
  if (obj && typeof obj === "object") {
    const keys = Object.keys(obj);
    if (keys.length === 1 && keys[0] === "$float") {
      const tags = { inf: Infinity, "-inf": -Infinity, nan: NaN };
      if (!(obj.$float in tags)) throw new TypeError(`bad $float tag ${obj.$float}`);
      return tags[obj.$float];
    }
    if (keys.length === 1 && keys[0] === "$tensor") {
      if (!tensors || !(obj.$tensor in tensors)) throw new TypeError(`$tensor ${obj.$tensor} names no tensor`);
      return tensors[obj.$tensor];
    }
    if (isJsonTensor(obj)) return decodeJsonTensor(obj);
    return Object.fromEntries(Object.entries(obj).map(([k, v]) => [k, treeFromJson(v, tensors)]));
  }
  return obj;
}

/** A tree with Tensors to (JSON skeleton with {"$tensor": key} refs, tensors keyed by path). */
export function treeToSafetensors(obj) {
  const tensors = {};
  const skeleton = mapTree(obj, (t, path) => {
    tensors[path] = t;
    return { $tensor: path };
  });
  return { skeleton, tensors };
}

function mapTree(obj, onTensor, path = "") {
  const sub = (k) => (path ? `${path}.${k}` : String(k));
  if (obj instanceof Tensor) return onTensor(obj, path);
  if (Array.isArray(obj)) return obj.map((v, i) => mapTree(v, onTensor, sub(i)));
  if (typeof obj === "number" && !Number.isFinite(obj)) {
    return { $float: Number.isNaN(obj) ? "nan" : obj > 0 ? "inf" : "-inf" };
  }
  if (obj && typeof obj === "object") {
    return Object.fromEntries(Object.entries(obj).map(([k, v]) => [k, mapTree(v, onTensor, sub(k))]));
  }
  return obj;
}

// ---------------------------------------------------------------------------- safetensors

const textEncoder = new TextEncoder();
const textDecoder = new TextDecoder("utf-8", { fatal: true });

/**
 * Write a safetensors file: tensors by name plus string `__metadata__` (non-string values are
 * written as JSON text). Returns a Uint8Array.
 */
export function writeSafetensors(tensors, metadata) {
  const entries = Object.entries(tensors).map(([name, t]) => [name, asTensor(t)]);
  // larger items first, then by name: every tensor's offset is aligned to its itemsize
  entries.sort(([na, a], [nb, b]) => b.itemsize - a.itemsize || (na < nb ? -1 : na > nb ? 1 : 0));
  const header = {};
  if (metadata && Object.keys(metadata).length) {
    header.__metadata__ = Object.fromEntries(
      Object.entries(metadata).map(([k, v]) => [k, typeof v === "string" ? v : stringify(v)]),
    );
  }
  let offset = 0;
  for (const [name, t] of entries) {
    const n = t.data.byteLength;
    header[name] = { dtype: DTYPES[t.dtype].st, shape: t.shape, data_offsets: [offset, offset + n] };
    offset += n;
  }
  let headerBytes = textEncoder.encode(JSON.stringify(header));
  const pad = (8 - (headerBytes.length % 8)) % 8; // data starts 8-byte aligned, as safetensors does
  if (pad) {
    const padded = new Uint8Array(headerBytes.length + pad).fill(0x20);
    padded.set(headerBytes);
    headerBytes = padded;
  }
  const out = new Uint8Array(8 + headerBytes.length + offset);
  new DataView(out.buffer).setBigUint64(0, BigInt(headerBytes.length), true);
  out.set(headerBytes, 8);
  // each tensor's bytes copied once, straight from its own memory into the file
  let pos = 8 + headerBytes.length;
  for (const [, t] of entries) {
    const src = t.data;
    out.set(new Uint8Array(src.buffer, src.byteOffset, src.byteLength), pos);
    if (!LITTLE_ENDIAN && src.BYTES_PER_ELEMENT > 1) swapInPlace(out.subarray(pos, pos + src.byteLength), src.BYTES_PER_ELEMENT);
    pos += src.byteLength;
  }
  return out;
}

/**
 * Read a safetensors file (ArrayBuffer or Uint8Array): {tensors: {name: Tensor}, metadata: {key: string}}.
 * Each tensor's data is a view of the file's bytes where its offset suits its dtype (a
 * Float32Array needs a multiple of 4: any file this client or the server writes, read from a
 * buffer of its own), else a copy; so writing into `buf` afterwards changes those tensors.
 */
export function readSafetensors(buf) {
  const bytes = buf instanceof Uint8Array ? buf : new Uint8Array(buf);
  if (bytes.length < 8) throw new TypeError("not a safetensors file: shorter than 8 bytes");
  const n = Number(new DataView(bytes.buffer, bytes.byteOffset, 8).getBigUint64(0, true));
  if (n > bytes.length - 8) throw new TypeError(`safetensors header claims ${n} bytes, file has ${bytes.length - 8}`);
  const header = JSON.parse(textDecoder.decode(bytes.subarray(8, 8 + n)));
  const metadata = header.__metadata__ ?? {};
  delete header.__metadata__;
  const data = bytes.subarray(8 + n);
  const tensors = {};
  for (const [name, info] of Object.entries(header)) {
    const dtype = FROM_ST[info.dtype];
    if (!dtype) throw new TypeError(`unsupported safetensors dtype ${info.dtype} for ${name}`);
    const [begin, end] = info.data_offsets;
    if (!(begin >= 0 && begin <= end && end <= data.length)) throw new RangeError(`${name}: data_offsets out of range`);
    if (end - begin !== prod(info.shape) * DTYPES[dtype].itemsize) throw new RangeError(`${name}: size mismatch`);
    tensors[name] = new Tensor(dtype, info.shape, bytesToTypedView(dtype, data.subarray(begin, end)));
  }
  return { tensors, metadata };
}

/** `__metadata__` values are JSON texts, except bare words (strings). */
export function parseMetadata(metadata) {
  const out = {};
  for (const [k, v] of Object.entries(metadata)) {
    try {
      out[k] = JSON.parse(v);
    } catch {
      out[k] = v;
    }
  }
  return out;
}

// --------------------------------------------------------------------------------- errors

/** An error answer (RFC 9457 problem+json) or a failure to reach the server (status 0). */
export class OptserveError extends Error {
  constructor(message, { status = 0, code = "error", detail = message, field, problem, title, type, cause } = {}) {
    super(message, cause ? { cause } : undefined);
    this.name = new.target.name;
    this.status = status;
    this.code = code;
    this.detail = detail;
    this.field = field;
    this.title = title;
    this.type = type;
    this.problem = problem;
    /** The Idempotency-Key of the failed call (mutating calls): send the call again with it. */
    this.idempotencyKey = undefined;
  }
}
export class BadRequestError extends OptserveError {} // 400
/** 401: no API key, or one the server does not know (the Python SDK's AuthenticationError). */
export class AuthenticationError extends OptserveError {}
/** 403: the key may not do this (the Python SDK's PermissionDeniedError). */
export class PermissionDeniedError extends OptserveError {}
export class NotFoundError extends OptserveError {} // 404
export class ConflictError extends OptserveError {} // 409
/** 412 precondition_failed: a conditional change (baseVersion, baseRevision on importState,
 * putParams, updateParamGroup, ...) named a session version or revision the session has left;
 * nothing was applied. */
export class PreconditionFailedError extends OptserveError {}
export class PayloadTooLargeError extends OptserveError {} // 413
export class ValidationError extends OptserveError {} // 422
/** 429: a per-tenant limit is reached (the Python SDK's RateLimitError); never retried. */
export class RateLimitError extends OptserveError {}
/** 503: nothing was applied; retry after `retryAfter` seconds (storage_error, session_damaged). */
export class UnavailableError extends OptserveError {}
/** 507 storage_full: the operation did not fit on the server's disk; nothing was applied. */
export class StorageFullError extends OptserveError {}
/** The server could not be reached, or did not answer within timeoutMs (status 0). */
export class ConnectionError extends OptserveError {}

const ERROR_CLASSES = {
  400: BadRequestError, 401: AuthenticationError, 403: PermissionDeniedError, 404: NotFoundError,
  409: ConflictError, 412: PreconditionFailedError, 413: PayloadTooLargeError, 422: ValidationError, 429: RateLimitError,
  503: UnavailableError, 507: StorageFullError,
};
/** Backoff: retryDelayMs * 2**attempt, capped at this, then scaled by a random factor in
 * [1 - RETRY_JITTER, 1] so that many workers do not retry in lockstep (as the Python SDK). */
const MAX_RETRY_DELAY_MS = 4000;
/** With maxRetries left out, a failed call is retried while less than this many milliseconds
 * (retryBudgetMs) have passed since its first failure: a server restart takes 5-15 s on a
 * loaded machine (the Python SDK's retry_budget). */
const DEFAULT_RETRY_BUDGET_MS = 60000;
const RETRY_JITTER = 0.25;
/** A 503's Retry-After is waited in full up to this (maxRetryAfterMs); one asking for longer is
 * thrown at once, as the server said an earlier retry would fail (session_damaged and
 * no_capacity ask 30 s). The Python SDK's max_retry_after. */
const DEFAULT_MAX_RETRY_AFTER_MS = 60000;
/** The server holds a long poll (?wait_s=) at most this long. */
const MAX_WAIT_S = 60;

/** The base URL without its trailing slashes; a RangeError naming it unless it is an absolute
 * http(s) URL ("127.0.0.1:8000" without a scheme would fail only at the first request). */
function checkedBaseUrl(baseUrl) {
  const text = String(baseUrl).replace(/\/+$/, "");
  let url;
  try {
    url = new URL(text);
  } catch {
    url = undefined;
  }
  if (url === undefined || (url.protocol !== "http:" && url.protocol !== "https:") || !url.host) {
    throw new RangeError(`baseUrl must be an absolute http:// or https:// URL (e.g. "http://127.0.0.1:8000"), got ${JSON.stringify(String(baseUrl))}`);
  }
  return text;
}

/** Seconds the server holds a long poll of ?wait_s=waitS (it caps the wait at MAX_WAIT_S). */
function held(waitS) {
  return Number(waitS) > 0 ? Math.min(Number(waitS), MAX_WAIT_S) : 0;
}

/** A session version or revision: a whole number >= 0 (a TypeError before anything is sent). */
function wholeNumber(value, name) {
  if (!Number.isSafeInteger(value) || value < 0) throw new TypeError(`${name} must be a whole number >= 0, got ${JSON.stringify(value)}`);
  return value;
}

function newIdempotencyKey() {
  return globalThis.crypto.randomUUID().replaceAll("-", "");
}

/** The typed error for an HTTP status and a parsed problem+json body (or null). */
export function errorFromProblem(status, problem, fallbackText = "") {
  const Cls = ERROR_CLASSES[status] ?? OptserveError;
  const p = problem && typeof problem === "object" ? problem : null;
  const detail = p?.detail ?? (fallbackText || `HTTP ${status}`);
  const message = `${status} ${p?.code ?? "http_error"}: ${detail}${p?.field ? ` (field ${p.field})` : ""}`;
  return new Cls(message, {
    status, code: p?.code ?? "http_error", detail, field: p?.field ?? undefined,
    title: p?.title, type: p?.type, problem: p ?? undefined,
  });
}

// --------------------------------------------------------------------------------- client

const JSON_TYPE = "application/json";
const BINARY = "application/octet-stream";

function toBytes(body) {
  if (body instanceof Uint8Array) return body;
  if (body instanceof ArrayBuffer) return new Uint8Array(body);
  if (ArrayBuffer.isView(body)) return new Uint8Array(body.buffer, body.byteOffset, body.byteLength);
  throw new TypeError("expected a Uint8Array or ArrayBuffer");
}

/**
 * Why a fetch failed, from its cause: Node's fetch throws a bare TypeError("fetch failed") whose
 * cause is the system error ("connect ECONNREFUSED"; an AggregateError when several addresses
 * were tried) or undici's own ("other side closed"). Browsers give only their own message.
 */
function networkReason(err) {
  let c = err?.cause ?? err;
  if (c instanceof AggregateError && c.errors?.length) c = c.errors[0];
  if (c?.code && c?.syscall) return { reason: `${c.syscall} ${c.code}`, code: c.code };
  return { reason: String(c?.message || c?.code || err?.message || err), code: c?.code };
}

/** The ConnectionError message for a request that got no answer at all. */
function unreachableMessage(url, err) {
  const { reason, code } = networkReason(err);
  let hint = "is the server running?";
  if (code === "ENOTFOUND" || code === "EAI_AGAIN") hint = "is the host name right?";
  else if (reason === "bad port") hint = "fetch refuses this port; run the server on another";
  return `cannot reach optserve at ${url}: ${reason} (${hint})`;
}

function versionFromHeaders(res) {
  const v = res.headers.get("x-optserve-version");
  const s = res.headers.get("x-optserve-step");
  return { version: v === null ? undefined : Number(v), step: s === null ? undefined : Number(s) };
}

/**
 * The optserve HTTP client. Every method returns a Promise and throws a typed OptserveError
 * for problem+json answers.
 *
 *   const c = new OptserveClient({ baseUrl: "http://127.0.0.1:8000" });
 *   await c.createSession({ optimizer: "SGD", options: { lr: 1 }, params: { x: Tensor.from([2]) } });
 *   const { params } = await c.step(id, { x: Tensor.from([16]) });
 */
/** Problem codes of an evaluation whose LBFGS step the server no longer holds. */
const STEP_GONE = new Set(["evaluation_not_found", "step_not_found"]);
/** How many times lbfgsStep opens a step again that the server no longer holds. */
const LBFGS_REOPENS = 3;

export class OptserveClient {
  constructor(callOptions = {}) {
    const {
      baseUrl = "http://127.0.0.1:8000", apiKey, timeoutMs = 30000, fetch: fetchImpl, binary = false, maxRetries,
      retryBudgetMs, retryDelayMs = 500, maxRetryAfterMs = DEFAULT_MAX_RETRY_AFTER_MS, sleep, random, now,
    } = optionsOf(callOptions, ["baseUrl", "apiKey", "timeoutMs", "fetch", "binary", "maxRetries", "retryBudgetMs",
      "retryDelayMs", "maxRetryAfterMs", "sleep", "random", "now"], "OptserveClient");
    this.baseUrl = checkedBaseUrl(baseUrl);
    this.apiKey = apiKey;
    this.timeoutMs = timeoutMs;
    this.binary = binary; // default for step / grads / params calls
    if (maxRetries !== undefined && maxRetries !== null && !(Number.isInteger(maxRetries) && maxRetries >= 0)) {
      throw new RangeError(`maxRetries must be a non-negative integer, got ${maxRetries}`);
    }
    if (retryBudgetMs !== undefined && retryBudgetMs !== null && !(Number.isFinite(retryBudgetMs) && retryBudgetMs >= 0)) {
      throw new RangeError(`retryBudgetMs must be a non-negative number of milliseconds, got ${retryBudgetMs}`);
    }
    // no count (the default): retried while retryBudgetMs (60 s) have not passed since the first
    // failure; a count: that many retries, with no bound in time unless retryBudgetMs is given
    this.maxRetries = maxRetries ?? null;
    this.retryBudgetMs = retryBudgetMs ?? (this.maxRetries === null ? DEFAULT_RETRY_BUDGET_MS : null);
    this.retryDelayMs = retryDelayMs;
    if (!(Number(maxRetryAfterMs) >= 0)) throw new RangeError(`maxRetryAfterMs must be a non-negative number, got ${maxRetryAfterMs}`);
    this.maxRetryAfterMs = Number(maxRetryAfterMs);
    this._fetch = fetchImpl ?? globalThis.fetch.bind(globalThis);
    // sleep(ms) -> Promise and random() -> [0, 1): the waits between retries and their jitter
    // (given by tests, or a caller with a scheduler of its own)
    this._sleep = sleep ?? ((ms) => new Promise((resolve) => setTimeout(resolve, ms)));
    this._random = random ?? Math.random;
    // now() -> milliseconds: the clock of the retry budget (given by tests with their sleep)
    this._now = now ?? (() => performance.now());
  }

  /** Whether retry number attempt + 1 is within maxRetries and the retry budget (milliseconds
   * since the call's first failure, at firstFailure). */
  _mayRetry(attempt, firstFailure) {
    if (this.maxRetries !== null && attempt >= this.maxRetries) return false;
    return this.retryBudgetMs === null || this._now() - firstFailure < this.retryBudgetMs;
  }

  /** Milliseconds before retry number attempt + 1: exponential, capped, with random jitter. */
  _retryDelay(attempt) {
    const full = Math.min(this.retryDelayMs * 2 ** attempt, MAX_RETRY_DELAY_MS);
    return full * (1 - RETRY_JITTER * this._random());
  }

  /**
   * One call, exactly once: a mutating call (anything but GET) carries a fresh Idempotency-Key,
   * kept for its retries, so the server answers a retry of what it already applied instead of
   * applying it again. Retried (while retryBudgetMs, default 60 s, have not passed since the
   * first failure, or up to maxRetries when given; exponential delay with jitter): no answer at all
   * (ConnectionError), and 503 after its Retry-After (the server applied nothing; one asking for
   * longer than maxRetryAfterMs, default 60 s, is thrown at once).
   * opts.idempotencyKey: the key to send (default: a fresh one). When every retry failed, the
   * error's `idempotencyKey` is the key the call went out with: sending the call again later
   * with it (`step(id, grads, {idempotencyKey: err.idempotencyKey})`, once the server is back)
   * is answered, not applied twice, if the server had applied it.
   */
  async request(method, path, opts = {}) {
    const headers = { ...(opts.headers ?? {}) };
    const given = Object.keys(headers).find((h) => h.toLowerCase() === "idempotency-key");
    if (opts.idempotencyKey !== undefined) {
      if (given !== undefined) delete headers[given];
      headers["Idempotency-Key"] = String(opts.idempotencyKey);
    } else if (method !== "GET" && given === undefined) {
      headers["Idempotency-Key"] = newIdempotencyKey();
    }
    const key = headers[Object.keys(headers).find((h) => h.toLowerCase() === "idempotency-key")];
    let firstFailure;
    for (let attempt = 0; ; attempt++) {
      try {
        return await this._attempt(method, path, { ...opts, headers });
      } catch (err) {
        firstFailure ??= this._now();
        // a 503 asking for a longer wait than maxRetryAfterMs: thrown now (its retryAfter says
        // how long), not retried early
        const tooLong = err.retryAfter !== undefined && err.retryAfter * 1000 > this.maxRetryAfterMs;
        // a session out of service that nothing restores (session_damaged without Retry-After:
        // it keeps nothing on disk; delete it): a retry cannot help
        const gone = err.code === "session_damaged" && err.retryAfter === undefined;
        // a port fetch refuses to use (9, 6000, ...; "bad port"): refused before any connection,
        // the same at every retry
        const badPort = err instanceof ConnectionError && networkReason(err.cause).reason === "bad port";
        const retryable = (err instanceof ConnectionError || err instanceof UnavailableError) && !tooLong && !gone && !badPort;
        if (!retryable || !this._mayRetry(attempt, firstFailure)) {
          if (key !== undefined && err instanceof OptserveError) err.idempotencyKey = key;
          throw err;
        }
        let delay = this._retryDelay(attempt);
        if (err.retryAfter !== undefined) delay = Math.max(delay, err.retryAfter * 1000);
        await this._sleep(delay);
      }
    }
  }

  /** One HTTP exchange. Returns the Response; throws typed errors for non-2xx answers. */
  async _attempt(method, path, { query, json, body, contentType, accept = JSON_TYPE, headers: extra, holdS = 0 } = {}) {
    let url = this.baseUrl + path;
    if (query) {
      const qs = new URLSearchParams();
      for (const [k, v] of Object.entries(query)) {
        if (v === undefined || v === null) continue;
        for (const item of Array.isArray(v) ? v : [v]) qs.append(k, String(item));
      }
      const s = qs.toString();
      if (s) url += `?${s}`;
    }
    const headers = { Accept: accept, ...(extra ?? {}) };
    if (this.apiKey) headers.Authorization = `Bearer ${this.apiKey}`;
    if (json !== undefined) {
      body = stringify(json);
      headers["Content-Type"] = JSON_TYPE;
    } else if (body !== undefined) {
      headers["Content-Type"] = contentType ?? BINARY;
    }
    const controller = new AbortController();
    // holdS: how long the server may hold the request before it answers, on top of timeoutMs
    // (a long poll's wait; Infinity: a worker's push, which waits for the other workers of its
    // round, bounded by the round's own timeout, as the Python SDK leaves it)
    const limitMs = this.timeoutMs && Number.isFinite(holdS) ? this.timeoutMs + holdS * 1000 : 0;
    const timer = limitMs ? setTimeout(() => controller.abort(), limitMs) : null;
    let res;
    try {
      res = await this._fetch(url, { method, headers, body, signal: controller.signal });
      if (res.status === 304) return { res, buf: new Uint8Array(0) };
      if (!res.ok) {
        const text = await res.text();
        let problem = null;
        try {
          problem = JSON.parse(text);
        } catch { /* not JSON: keep the text */ }
        const error = errorFromProblem(res.status, problem, text.slice(0, 500));
        const afterHeader = res.headers.get("retry-after"); // Number(null) would be 0
        const after = afterHeader === null ? NaN : Number(afterHeader);
        if (Number.isFinite(after) && after >= 0) error.retryAfter = after;
        throw error;
      }
      // read the body before the timer stops, so a stalled body also times out
      const buf = new Uint8Array(await res.arrayBuffer());
      return { res, buf };
    } catch (err) {
      if (err instanceof OptserveError) throw err;
      const timedOut = controller.signal.aborted;
      let message;
      if (timedOut) message = `${method} ${url}: no answer from optserve within ${limitMs} ms`;
      else if (res) message = `${method} ${url}: the connection to optserve broke while reading the answer: ${networkReason(err).reason}`;
      else message = unreachableMessage(url, err);
      throw new ConnectionError(message, { status: 0, code: timedOut ? "timeout" : "connection_error", cause: err });
    } finally {
      if (timer) clearTimeout(timer);
    }
  }

  async _json(method, path, opts) {
    const { buf } = await this.request(method, path, opts);
    return buf.length ? JSON.parse(textDecoder.decode(buf)) : undefined;
  }

  _sid(id) {
    if (typeof id !== "string" || !id) throw new TypeError("session id must be a non-empty string");
    return `/v1/sessions/${encodeURIComponent(id)}`;
  }

  /** Tensors out of a step / params answer, JSON or safetensors. */
  async _tensorsCall(method, path, { tensors, key, binary, encoding, query = {}, headers, extra, body, holdS = held(query.wait_s), idempotencyKey }) {
    // body: {json} or {body, contentType} sent as is (when tensors is undefined)
    // holdS: how long the server may hold it (default: a long poll's ?wait_s=)
    // extra: more top-level body fields (JSON), or safetensors __metadata__ entries (JSON texts)
    binary = binary ?? this.binary;
    const q = { ...query };
    if (!binary && encoding && encoding !== "data") q.encoding = encoding;
    const opts = { query: q, accept: binary ? BINARY : JSON_TYPE, headers, holdS, idempotencyKey };
    if (tensors !== undefined) {
      const map = tensorMap(tensors);
      if (binary) {
        const meta = extra ? Object.fromEntries(Object.entries(extra).map(([k, v]) => [k, stringify(v)])) : undefined;
        opts.body = writeSafetensors(flattenSparse(map), meta);
      } else {
        const enc = {};
        for (const [n, t] of Object.entries(map)) {
          enc[n] = t instanceof SparseRows ? encodeSparseRows(t, { b64: encoding === "b64" }) : encodeJsonTensor(t, { b64: encoding === "b64" });
        }
        opts.json = { [key]: enc, ...(extra ?? {}) };
      }
    } else if (body !== undefined) {
      Object.assign(opts, body);
    }
    const { res, buf } = await this.request(method, path, opts);
    const headerInfo = versionFromHeaders(res);
    const etag = res.headers.get("etag") ?? undefined;
    if (res.status === 304) return { ...headerInfo, etag, notModified: true };
    if ((res.headers.get("content-type") ?? "").startsWith(BINARY)) {
      const { tensors: out, metadata } = readSafetensors(buf);
      const { sparse, ...meta } = parseMetadata(metadata);
      // lr, loss and metrics carry non-finite floats as {"$float": "nan"} tags
      const result = { ...headerInfo, ...treeFromJson(meta), etag };
      if (query.return !== "none") result.params = sparse ? pairSparse(out, sparse) : out;
      return result;
    }
    const { params, ...rest } = JSON.parse(textDecoder.decode(buf));
    const obj = treeFromJson(rest); // lr, loss and metrics: {"$float": "nan"} tags to numbers
    if (params) obj.params = Object.fromEntries(Object.entries(params).map(([n, t]) => [n, decodeAnyTensor(t)]));
    obj.etag = etag;
    return obj;
  }

  // ------------------------------------------------------------------- health, catalogue

  /** GET /healthz */
  health() {
    return this._json("GET", "/healthz");
  }

  /** GET /readyz: {status: "ready", device}; throws OptserveError (status 503) when not ready. */
  ready() {
    return this._json("GET", "/readyz");
  }

  /** GET /v1/optimizers: {optimizers: [{name, defaults}], unsupported: [...]} */
  listOptimizers() {
    return this._json("GET", "/v1/optimizers");
  }

  /** GET /v1/schedulers: {schedulers: [{name, required, defaults, default_step_on}], unsupported} */
  listSchedulers() {
    return this._json("GET", "/v1/schedulers");
  }

  // ------------------------------------------------------------------------------ sessions

  /**
   * POST /v1/sessions. spec: {optimizer, options?, params?: {name: tensor}, paramGroups?:
   * [{params: {name: tensor}, ...options}], scheduler?: {name, options, step_on?}, id?, nonfinite?}.
   * With {binary: true} the tensors travel as a safetensors body; as JSON, encoding "b64" sends
   * them base64 (their bytes: smaller and faster than "data", the default, for large creates),
   * a tensor option (a tensor lr) too.
   * Returns the session description.
   */
  createSession(spec, callOptions = {}) {
    let { binary = false, encoding = "data", idempotencyKey } = optionsOf(callOptions, ["binary", "encoding", "idempotencyKey"], "createSession");
    if (encoding !== "data" && encoding !== "b64") throw new TypeError(`encoding must be "data" or "b64", got ${JSON.stringify(encoding)}`);
    const { paramGroups, param_groups: pg, params, ...rest } = spec;
    const groups = paramGroups ?? pg;
    if (binary) {
      const tensors = {};
      const meta = {};
      // every value as JSON text, so an id such as "123" stays a string
      for (const [k, v] of Object.entries(rest)) if (v !== undefined) meta[k] = stringify(treeToJson(v));
      if (groups) {
        meta.param_groups = stringify(groups.map(({ params: gp, ...opts }) => {
          const m = tensorMap(gp);
          Object.assign(tensors, m);
          return { ...treeToJson(opts), params: Object.keys(m) };
        }));
      } else {
        Object.assign(tensors, tensorMap(params));
      }
      return this._described("POST", "/v1/sessions", { body: writeSafetensors(tensors, meta), idempotencyKey });
    }
    // options as the server reads them: Infinity as {"$float": "inf"} (JSON has no literal for
    // it: JSON.stringify writes null), a tensor option (lr) as a JSON tensor in the encoding asked
    const enc = { b64: encoding === "b64" };
    const body = {};
    for (const [k, v] of Object.entries(rest)) if (v !== undefined) body[k] = treeToJson(v, enc);
    if (groups) body.param_groups = groups.map(({ params: gp, ...opts }) => ({ ...treeToJson(opts, enc), params: encodeMap(gp, enc) }));
    else body.params = encodeMap(params, enc);
    return this._described("POST", "/v1/sessions", { json: body, idempotencyKey });
  }

  /** A JSON answer whose numbers may be non-finite ({"$float": "inf"} tags: an lr). */
  async _described(method, path, opts) {
    return treeFromJson(await this._json(method, path, opts));
  }

  /** GET /v1/sessions: the list of session descriptions. */
  async listSessions() {
    return (await this._described("GET", "/v1/sessions")).sessions;
  }

  /**
   * GET /v1/sessions/{id}: the session description. atVersion: answered only at that version
   * (sent as If-Match), else a 412 OptserveError (precondition_failed, with current_version).
   */
  getSession(id, callOptions = {}) {
    const { atVersion } = optionsOf(callOptions, ["atVersion"], "getSession");
    return this._described("GET", this._sid(id), { headers: readAt(atVersion) });
  }

  /**
   * DELETE /v1/sessions/{id}.
   * Conditional with baseVersion / baseRevision, as importState.
   */
  async deleteSession(id, callOptions = {}) {
    let { idempotencyKey, baseVersion, baseRevision } = optionsOf(callOptions, ["idempotencyKey", "baseVersion", "baseRevision"], "deleteSession");
    await this.request("DELETE", this._sid(id), { ...preconditions(baseVersion, baseRevision), idempotencyKey });
  }

  /**
   * POST /v1/sessions/{id}/step with grads {name: tensor}. Options: binary (safetensors both ways),
   * encoding ("data" | "b64" for JSON), returnParams (false: only version/step/lr; "touched":
   * only the rows stepped with sparse gradients, as SparseRows, and the parameters stepped with
   * dense ones). A gradient may be SparseRows (some rows of an embedding table).
   * paramGroups: option changes made atomically with the step, by group index
   * ({0: {lr: 1e-3, betas: [0.9, 0.99]}}, or an array); a refused option fails the whole step.
   * A value replaces the group's (torch's group["lr"] = v); the options an entry's "$fill" lists
   * ({0: {lr: Tensor.scalar(5e-4), $fill: ["lr"]}}) are filled into the tensor the group holds,
   * as a torch scheduler fills a tensor lr: the defaults and every group holding it follow.
   * upcast: accept float16/bfloat16 gradients for float32/float64 parameters (widened once on
   * the server, which keeps its precision); paramsDtype: "bfloat16" or "float16" sends the
   * parameters back narrowed (only those wider than it). scalars: {name: number} recorded in
   * the step's metrics and history (a loss, an accuracy). metrics: "history" leaves the step's
   * norms out of the answer (no metrics field): the server takes them after answering, off the
   * step's path, into the session's history (before any later operation on it).
   * A tensor option (a tensor lr) in paramGroups travels in the body's encoding (b64 with
   * encoding "b64").
   * Returns {version, step, lr, skipped, nonfinite?, metrics?, params?: {name: Tensor}, etag}.
   */
  step(id, grads = {}, callOptions = {}) {
    let { binary, encoding, returnParams = true, worker, baseVersion, paramGroups, upcast, paramsDtype, scalars, metrics, idempotencyKey } =
      optionsOf(callOptions, ["binary", "encoding", "returnParams", "worker", "baseVersion", "paramGroups", "upcast", "paramsDtype",
        "scalars", "metrics", "idempotencyKey"], "step");
    // worker: this push's worker id in a sync (parameter-server) session (X-Optserve-Worker);
    // baseVersion: the version the gradients were computed from (bounded staleness).
    const query = returnParams === "touched" ? { return: "touched" } : returnParams ? {} : { return: "none" };
    if (baseVersion !== undefined) query.base_version = baseVersion;
    if (upcast) query.upcast = "true";
    if (paramsDtype !== undefined) query.params_dtype = paramsDtype;
    if (metrics !== undefined) {
      if (metrics !== "answer" && metrics !== "history") throw new TypeError('metrics must be "answer" or "history"');
      if (metrics === "history") query.metrics = "history";
    }
    const headers = worker !== undefined ? { "X-Optserve-Worker": String(worker) } : undefined;
    const extra = {};
    if (paramGroups !== undefined) extra.param_groups = treeToJson(paramGroups, { b64: !(binary ?? this.binary) && encoding === "b64" });
    if (scalars !== undefined) extra.scalars = scalars;
    return this._tensorsCall("POST", `${this._sid(id)}/step`, {
      tensors: grads, key: "grads", binary, encoding, query, headers,
      extra: Object.keys(extra).length ? extra : undefined, holdS: worker !== undefined ? Infinity : 0, idempotencyKey,
    });
  }

  /**
   * PATCH /v1/sessions/{id}: parameter-server options ({sync: {workers, reduce, timeout_s,
   * on_timeout} | null, max_staleness, staleness_lr}); absent fields keep their value.
   * Conditional with baseVersion / baseRevision, as importState.
   */
  configureSession(id, options, callOptions = {}) {
    let { idempotencyKey, baseVersion, baseRevision } = optionsOf(callOptions, ["idempotencyKey", "baseVersion", "baseRevision"], "configureSession");
    return this._described("PATCH", this._sid(id), { ...preconditions(baseVersion, baseRevision), json: treeToJson(options), idempotencyKey });
  }

  /**
   * POST /v1/sessions/{id}/grads: accumulate for the next step. upcast: accept float16/bfloat16
   * gradients for wider parameters; scalars: {name: number} recorded with the next step (several
   * pushes: their mean). Returns {version, step, accumulated}.
   */
  pushGrads(id, grads, callOptions = {}) {
    let { binary, upcast, scalars, idempotencyKey } = optionsOf(callOptions, ["binary", "upcast", "scalars", "idempotencyKey"], "pushGrads");
    binary = binary ?? this.binary;
    const map = tensorMap(grads);
    const query = upcast ? { upcast: "true" } : {};
    if (binary) {
      const meta = scalars === undefined ? undefined : { scalars: stringify(scalars) };
      return this._json("POST", `${this._sid(id)}/grads`, { query, body: writeSafetensors(flattenSparse(map), meta), idempotencyKey });
    }
    const json = { grads: encodeMap(map), ...(scalars === undefined ? {} : { scalars }) };
    return this._json("POST", `${this._sid(id)}/grads`, { query, json, idempotencyKey });
  }

  /** POST /v1/sessions/{id}/zero_grad: clear the accumulated gradients. */
  zeroGrad(id, callOptions = {}) {
    let { idempotencyKey } = optionsOf(callOptions, ["idempotencyKey"], "zeroGrad");
    return this._json("POST", `${this._sid(id)}/zero_grad`, { idempotencyKey });
  }

  /** GET /v1/sessions/{id}/params (names: optional list). Returns {version, step, params, etag}. */
  getParams(id, callOptions = {}) {
    let { names, binary, encoding, ifNoneMatch, minVersion, waitS, atVersion, paramsDtype } = optionsOf(callOptions, ["names", "binary", "encoding", "ifNoneMatch", "minVersion", "waitS", "atVersion", "paramsDtype"], "getParams");
    // ifNoneMatch: a version, or the etag a result carries; {notModified: true} comes back
    // while it is current.
    // minVersion + waitS: long-poll until the session reaches minVersion (or waitS passes).
    // atVersion: answered only at that version (If-Match), else a 412, as getSession.
    // paramsDtype: "bfloat16" or "float16" sends the parameters narrowed, as a step's answer
    // with paramsDtype (raw bits in a Uint16Array; the session keeps its own).
    if (names !== undefined && names !== null && (!Array.isArray(names) || !names.length)) {
      throw new TypeError("getParams: names must be a non-empty list of parameter names (leave it out to pull them all)");
    }
    for (const n of names ?? []) {
      if (n === "") throw new TypeError('getParams: a parameter name cannot be "" (?names= would name none)');
      if (typeof n !== "string" || n.includes(",")) {
        throw new TypeError(`cannot ask for parameter ${JSON.stringify(n)} by name (a comma separates names in ?names=); pull all parameters instead`);
      }
    }
    const query = names ? { names: names.join(",") } : {};
    if (minVersion !== undefined) query.min_version = minVersion;
    if (waitS !== undefined) query.wait_s = waitS;
    if (paramsDtype !== undefined) query.params_dtype = paramsDtype;
    const headers = readAt(atVersion);
    if (ifNoneMatch !== undefined) headers["If-None-Match"] = noneMatch(ifNoneMatch);
    return this._tensorsCall("GET", `${this._sid(id)}/params`, { binary, encoding, query, headers });
  }

  /**
   * Some rows of some parameters: rows = {name: [i, ...] | BigInt64Array | int64 Tensor}.
   * GET .../params?name=&rows= for one parameter and at most 256 rows, else POST .../params/rows.
   * Returns {version, step, lr, params: {name: SparseRows}, etag} (rows in the order asked), or
   * {notModified: true} while ifNoneMatch names the current version. paramsDtype: the rows
   * narrowed to "bfloat16" or "float16", as getParams.
   */
  getRows(id, rows, callOptions = {}) {
    let { binary, encoding, ifNoneMatch, minVersion, waitS, paramsDtype } = optionsOf(callOptions, ["binary", "encoding", "ifNoneMatch", "minVersion", "waitS", "paramsDtype"], "getRows");
    const lists = Object.fromEntries(Object.entries(rows).map(([n, r]) => [n, r instanceof Tensor ? Array.from(r.data, Number) : Array.from(r, Number)]));
    const names = Object.keys(lists);
    if (!names.length) throw new TypeError("rows must name at least one parameter");
    const query = {};
    if (minVersion !== undefined) query.min_version = minVersion;
    if (waitS !== undefined) query.wait_s = waitS;
    if (paramsDtype !== undefined) query.params_dtype = paramsDtype;
    const headers = ifNoneMatch !== undefined ? { "If-None-Match": noneMatch(ifNoneMatch) } : undefined;
    if (names.length === 1 && lists[names[0]].length <= 256 && !names[0].includes(",")) {
      Object.assign(query, { name: names[0], rows: lists[names[0]].join(",") });
      return this._tensorsCall("GET", `${this._sid(id)}/params`, { binary, encoding, query, headers });
    }
    binary = binary ?? this.binary;
    const body = binary
      ? { body: writeSafetensors(Object.fromEntries(names.map((n) => [n, Tensor.from(lists[n].map(BigInt), { dtype: "int64" })]))) }
      : { json: { rows: lists } };
    return this._tensorsCall("POST", `${this._sid(id)}/params/rows`, { binary, encoding, query, headers, body });
  }

  /**
   * One LBFGS step (a session created with optimizer "LBFGS"): the server runs torch's own
   * LBFGS.step and asks for the loss and gradients at each point its line search tries;
   * `evaluate(params)` (async allowed) answers with {loss: number, grads: {name: tensor}} at
   * those params ({name: Tensor}). `first` ({loss, grads} at the current parameters, which a
   * client usually has already) saves one round trip. Returns the step's end: {version, step,
   * lr, loss (the first evaluation's, as torch's step returns it), evaluations, params}.
   * A step the server no longer holds (it restarted between two evaluations, or the step
   * timed out: 404, nothing of it applied) is opened again from the session's values, at most
   * LBFGS_REOPENS times.
   */
  async lbfgsStep(id, evaluate, callOptions = {}) {
    let { binary, first, timeoutS, returnParams = true } = optionsOf(callOptions, ["binary", "first", "timeoutS", "returnParams"], "lbfgsStep");
    for (let reopened = 0; ; reopened++) {
      let answer = await this.openEvaluationStep(id, first, { binary, timeoutS, returnParams });
      try {
        while (answer.needs === "evaluation") {
          const ev = await evaluate(answer.params);
          answer = await this.evaluate(id, answer.evaluation, ev, { binary });
        }
        return answer;
      } catch (e) {
        if (!(e instanceof NotFoundError) || !STEP_GONE.has(e.code) || reopened >= LBFGS_REOPENS) throw e;
      }
    }
  }

  /**
   * POST /v1/sessions/{id}/step on an LBFGS session (with its first evaluation {loss, grads},
   * when given): {needs: "evaluation", step_id, evaluation, evaluations, params, ...}, or the
   * step's end.
   */
  openEvaluationStep(id, first, callOptions = {}) {
    let { binary, timeoutS, returnParams = true, idempotencyKey } = optionsOf(callOptions, ["binary", "timeoutS", "returnParams", "idempotencyKey"], "openEvaluationStep");
    const query = returnParams ? {} : { return: "none" };
    if (timeoutS !== undefined) query.timeout_s = timeoutS;
    return this._evaluationCall(`${this._sid(id)}/step`, first, { binary, query, idempotencyKey });
  }

  /** POST /v1/sessions/{id}/step/{evaluation} with {loss, grads}: the next question, or the end (safe to retry). */
  evaluate(id, evaluation, ev, callOptions = {}) {
    let { binary } = optionsOf(callOptions, ["binary"], "evaluate");
    return this._evaluationCall(`${this._sid(id)}/step/${encodeURIComponent(evaluation)}`, ev, { binary, query: {} });
  }

  /** DELETE /v1/sessions/{id}/step/{stepId}: abandon an open LBFGS step (the session unchanged). */
  async abandonStep(id, stepId) {
    return (await this._json("DELETE", `${this._sid(id)}/step/${encodeURIComponent(stepId)}`)).outcome;
  }

  _evaluationCall(path, ev, { binary, query, idempotencyKey }) {
    binary = binary ?? this.binary;
    if (!ev) return this._tensorsCall("POST", path, { binary, query, body: {}, idempotencyKey });
    const loss = Number.isFinite(ev.loss) ? ev.loss : Number.isNaN(ev.loss) ? "NaN" : ev.loss > 0 ? "Infinity" : "-Infinity";
    return this._tensorsCall("POST", path, { tensors: ev.grads ?? {}, key: "grads", binary, query, extra: { loss }, idempotencyKey });
  }

  /**
   * PUT /v1/sessions/{id}/params: overwrite. Returns {version, step, params, etag}.
   * Conditional with baseVersion / baseRevision, as importState.
   */
  putParams(id, params, callOptions = {}) {
    let { binary, encoding, idempotencyKey, baseVersion, baseRevision } = optionsOf(callOptions, ["binary", "encoding", "idempotencyKey", "baseVersion", "baseRevision"], "putParams");
    return this._tensorsCall("PUT", `${this._sid(id)}/params`, { ...preconditions(baseVersion, baseRevision), tensors: params, key: "params", binary, encoding, idempotencyKey });
  }

  /**
   * POST /v1/sessions/{id}/param_groups: group = {params: {name: tensor}, ...options}. As JSON,
   * encoding "b64" sends its tensors (params and a tensor lr) base64. Returns the description.
   * Conditional with baseVersion / baseRevision, as importState.
   */
  addParamGroup(id, group, callOptions = {}) {
    let { binary = false, encoding = "data", idempotencyKey, baseVersion, baseRevision } = optionsOf(callOptions, ["binary", "encoding", "idempotencyKey", "baseVersion", "baseRevision"], "addParamGroup");
    const conditions = preconditions(baseVersion, baseRevision);
    if (encoding !== "data" && encoding !== "b64") throw new TypeError(`encoding must be "data" or "b64", got ${JSON.stringify(encoding)}`);
    const enc = { b64: !binary && encoding === "b64" };
    const { params, ...rest } = group;
    const options = treeToJson(rest, enc); // Infinity as {"$float": "inf"}, tensors as JSON tensors
    if (binary) {
      const meta = Object.fromEntries(Object.entries(options).map(([k, v]) => [k, stringify(v)]));
      return this._described("POST", `${this._sid(id)}/param_groups`, { ...conditions, body: writeSafetensors(tensorMap(params), meta), idempotencyKey });
    }
    return this._described("POST", `${this._sid(id)}/param_groups`, { ...conditions, json: { ...options, params: encodeMap(params, enc) }, idempotencyKey });
  }

  /**
   * PATCH /v1/sessions/{id}/param_groups/{index}: change a group's options (encoding "b64": a
   * tensor option, a tensor lr, base64; "$fill": ["lr"] fills the tensor lr the group holds
   * instead of replacing it, as in a step's paramGroups). Returns the description.
   * Conditional with baseVersion / baseRevision, as importState.
   */
  updateParamGroup(id, index, options, callOptions = {}) {
    let { encoding = "data", idempotencyKey, baseVersion, baseRevision } = optionsOf(callOptions, ["encoding", "idempotencyKey", "baseVersion", "baseRevision"], "updateParamGroup");
    if (encoding !== "data" && encoding !== "b64") throw new TypeError(`encoding must be "data" or "b64", got ${JSON.stringify(encoding)}`);
    return this._described("PATCH", `${this._sid(id)}/param_groups/${Number(index)}`, { ...preconditions(baseVersion, baseRevision), json: treeToJson(options, { b64: encoding === "b64" }), idempotencyKey });
  }

  /**
   * GET /v1/sessions/{id}/state_dict. format "json" (default) or "safetensors" both return torch's
   * tree with Tensors ({state: {"0": {...}}, param_groups: [...], scheduler?}); "torch" returns the
   * torch.save file as a Uint8Array. raw: true returns the body bytes for any format.
   */
  async exportState(id, callOptions = {}) {
    let { format = "json", encoding, raw = false, atVersion } = optionsOf(callOptions, ["format", "encoding", "raw", "atVersion"], "exportState");
    const query = { format };
    if (format === "json" && encoding && encoding !== "data") query.encoding = encoding;
    const { buf } = await this.request("GET", `${this._sid(id)}/state_dict`, {
      query, accept: format === "json" ? JSON_TYPE : BINARY, headers: readAt(atVersion),
    });
    return raw ? buf : stateFromBody(buf, format);
  }

  /**
   * GET /v1/sessions/{id}/state_dict unless the session is still the one a result of this call
   * read, at the same revision: `tag`, the `tag` that result carries (the answer's
   * X-Optserve-State-Tag, "r<revision>.<token>", sent back as is in If-None-Match; every change
   * to the session moves its revision, an option PATCH too, which leaves the version alone, and
   * the token is minted anew whenever the server makes the session: a session deleted and made
   * again under the same id, or a restarted server, is read whole). Returns {state, version,
   * step, revision, tag} (state as exportState returns it), or {notModified: true, version,
   * step, revision, tag} while nothing changed the session since: nothing downloaded, keep the
   * state read before. Without `tag`, the whole state. A server that does not evaluate the tag
   * answers the whole state every time (one that gives none: `tag` undefined).
   */
  async exportStateIfChanged(id, callOptions = {}) {
    let { format = "json", encoding, tag } = optionsOf(callOptions, ["format", "encoding", "tag"], "exportStateIfChanged");
    const query = { format };
    if (format === "json" && encoding && encoding !== "data") query.encoding = encoding;
    const headers = tag === undefined ? {} : { "If-None-Match": stateTag(tag) };
    const { res, buf } = await this.request("GET", `${this._sid(id)}/state_dict`, {
      query, accept: format === "json" ? JSON_TYPE : BINARY, headers,
    });
    const answered = res.headers.get("x-optserve-revision");
    const answeredTag = res.headers.get("x-optserve-state-tag");
    const info = {
      ...versionFromHeaders(res),
      revision: answered === null ? undefined : Number(answered),
      tag: answeredTag === null ? undefined : answeredTag,
    };
    if (res.status === 304) return { ...info, notModified: true };
    return { ...info, state: stateFromBody(buf, format) };
  }

  /**
   * PUT /v1/sessions/{id}/state_dict. state: a tree with Tensors (as exportState returns), sent as
   * JSON (format "json", default) or safetensors (format "safetensors"); or bytes (Uint8Array /
   * ArrayBuffer) of a file in the given format ("json" | "safetensors" | "torch").
   * Conditional: baseVersion (sent as If-Match) imports only if the session is still at that
   * version (no step, import or overwrite since: the X-Optserve-Version / ETag the state was read
   * with); baseRevision (?base_revision=) only if nothing at all changed since (option changes and
   * scheduler steps too: the description's `revision`). Otherwise PreconditionFailedError (412),
   * nothing imported. Returns the session description.
   */
  importState(id, state, callOptions = {}) {
    let { format = "json", encoding, idempotencyKey, baseVersion, baseRevision } = optionsOf(callOptions, ["format", "encoding", "idempotencyKey", "baseVersion", "baseRevision"], "importState");
    const path = `${this._sid(id)}/state_dict`;
    const { query, headers } = preconditions(baseVersion, baseRevision);
    if (state instanceof Uint8Array || state instanceof ArrayBuffer) {
      const ctype = format === "json" ? JSON_TYPE : BINARY;
      return this._json("PUT", path, { query: { ...query, format }, headers, body: toBytes(state), contentType: ctype, idempotencyKey });
    }
    if (format === "safetensors") {
      const { skeleton, tensors } = treeToSafetensors(state);
      return this._json("PUT", path, { query: { ...query, format }, headers, body: writeSafetensors(tensors, { optserve_state: stringify(skeleton) }), idempotencyKey });
    }
    if (format !== "json") throw new TypeError(`format ${format} needs the file's bytes`);
    return this._json("PUT", path, { query, headers, json: treeToJson(state, { b64: encoding === "b64" }), idempotencyKey });
  }

  /**
   * POST /v1/sessions/{id}/scheduler/step ({metric} for ReduceLROnPlateau). A non-finite metric
   * goes as {"$float": "nan"} ("inf", "-inf"; JSON.stringify would write null: no metric), which
   * ReduceLROnPlateau takes as torch does (a NaN is never an improvement).
   * Conditional with baseVersion / baseRevision, as importState.
   */
  schedulerStep(id, callOptions = {}) {
    let { metric, idempotencyKey, baseVersion, baseRevision } = optionsOf(callOptions, ["metric", "idempotencyKey", "baseVersion", "baseRevision"], "schedulerStep");
    return this._described("POST", `${this._sid(id)}/scheduler/step`, { ...preconditions(baseVersion, baseRevision), json: metric === undefined ? {} : { metric: treeToJson(metric) }, idempotencyKey });
  }
}

/**
 * A conditional change's query and headers: baseVersion as If-Match, baseRevision as
 * ?base_revision= (each checked to be a whole number before anything is sent).
 */
function preconditions(baseVersion, baseRevision) {
  const query = {};
  const headers = {};
  if (baseVersion !== undefined) headers["If-Match"] = `"${wholeNumber(baseVersion, "baseVersion")}"`;
  if (baseRevision !== undefined) query.base_revision = wholeNumber(baseRevision, "baseRevision");
  return { query, headers };
}

// A conditional read's header: atVersion as If-Match (the server answers 412 when the answer
// would be of another version).
// exportStateIfChanged's tag: the X-Optserve-State-Tag a result carries, a quoted entity tag as
// the server writes it ("r<revision>.<token>"), sent back as is.
function stateTag(tag) {
  if (typeof tag !== "string" || !/^(W\/)?"r[0-9]+\.[0-9a-f]+"$/.test(tag)) {
    throw new TypeError(`tag must be the tag a result of exportStateIfChanged carries ("r<revision>.<token>"), got ${JSON.stringify(tag)}`);
  }
  return tag;
}

// A conditional read's If-None-Match: a version (5), or the etag a result carries ('"5"',
// 'W/"5"') as it is: quoting an etag again would make a tag the server ignores (a whole answer
// every time, never a 304). Anything else is a TypeError before anything is sent.
function noneMatch(value) {
  if (typeof value === "string" && /^(W\/)?"\d+"$/.test(value)) return value;
  if (typeof value === "string") throw new TypeError(`ifNoneMatch must be a version or an etag such as '"5"', got ${JSON.stringify(value)}`);
  return `"${wholeNumber(value, "ifNoneMatch")}"`;
}

// An exported state's body as exportState returns it: torch's tree with Tensors ("json",
// "safetensors"), or the torch.save file's bytes ("torch").
function stateFromBody(buf, format) {
  if (format === "torch") return buf;
  if (format === "safetensors") {
    const { tensors, metadata } = readSafetensors(buf);
    if (!("optserve_state" in metadata)) throw new TypeError("safetensors state lacks __metadata__.optserve_state");
    return treeFromJson(JSON.parse(metadata.optserve_state), tensors);
  }
  return treeFromJson(JSON.parse(textDecoder.decode(buf)));
}

function readAt(atVersion) {
  return atVersion === undefined ? {} : { "If-Match": `"${wholeNumber(atVersion, "atVersion")}"` };
}

function encodeMap(tensors, opts) {
  const out = {};
  for (const [name, t] of Object.entries(tensors ?? {})) out[name] = t instanceof SparseRows ? encodeSparseRows(t, opts) : encodeJsonTensor(t, opts);
  return out;
}

export default OptserveClient;
