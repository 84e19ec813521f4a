// A page on another origin than the API: create a session, step it with a JSON body and a
// safetensors body, read the exposed headers; the outcome goes to window.__result.
// Query: api, key (optional), x0, g1, g2 (JSON lists of float32 values), retries (optional:
// the client's maxRetries; a call the browser refuses, CORS off, fails at once with 0 instead
// of being retried for the default 60 s budget).
import { OptserveClient, Tensor } from "/optserve.js";

const q = new URLSearchParams(location.search);
const floats = (name) => Float32Array.from(JSON.parse(q.get(name)));
const x0 = floats("x0");
const tensor = (values) => new Tensor("float32", [values.length], values);

async function run() {
  const retries = q.get("retries");
  const c = new OptserveClient({ baseUrl: q.get("api"), apiKey: q.get("key") || undefined,
                                 ...(retries === null ? {} : { maxRetries: Number(retries) }) });
  // raw request for the create, to read its Location header
  const created = await c.request("POST", "/v1/sessions", {
    json: { optimizer: "SGD", options: { lr: 0.1, momentum: 0.9, weight_decay: 0.01 },
            params: { x: { dtype: "float32", shape: [x0.length], data: Array.from(x0) } } },
  });
  const session = JSON.parse(new TextDecoder().decode(created.buf));
  const afterJson = await c.step(session.id, { x: tensor(floats("g1")) });             // JSON body
  const afterBinary = await c.step(session.id, { x: tensor(floats("g2")) }, { binary: true });
  const { res } = await c.request("GET", `/v1/sessions/${session.id}/params`,
                                  { accept: "application/octet-stream" });
  await c.deleteSession(session.id);
  return {
    ok: true,
    id: session.id,
    location: created.res.headers.get("Location"),
    afterJson: Array.from(afterJson.params.x.data),
    afterBinary: Array.from(afterBinary.params.x.data),
    versions: [afterJson.version, afterBinary.version],
    headers: {
      version: res.headers.get("X-Optserve-Version"), step: res.headers.get("X-Optserve-Step"),
      etag: res.headers.get("ETag"), requestId: res.headers.get("X-Request-Id"),
      contentType: res.headers.get("Content-Type"),
    },
  };
}

run().then(
  (value) => { window.__result = value; },
  (err) => { window.__result = { ok: false, name: err?.name, code: err?.code, message: String(err?.message ?? err) }; },
);
