// optserve's page at /ui: the caller's sessions and, for one session, live plots of its
// per-step metrics. Plain ES module, no build step; charts by uPlot (vendored in
// app/static/uplot). Data: GET /v1/sessions, GET /v1/sessions/{id}, and
// GET /v1/sessions/{id}/history?points=W (each column as min/max per bucket, so a run of
// 100,000 steps is at most W points per series), then polled with ?since=<last n>.
// With API keys the page asks for one (kept in sessionStorage) and sends it as a Bearer token:
// the server shows each key only its own tenant's sessions.
import uPlot from "/ui/uplot/uPlot.esm.js";

const KEY = "optserve.key";
const POLL_MS = 1000;
const LIST_MS = 4000;
const COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777",
  "#4b5563"];
const CHARTS = [
  { id: "lr", title: "Learning rate", family: "lr", label: (i) => `group ${i}` },
  { id: "grad", title: "Gradient norm", family: "grad_norm", log: true, label: (i) => `group ${i}` },
  { id: "update", title: "Update norm ‖Δθ‖", family: "update_norm", log: true,
    label: (i) => `group ${i}` },
  { id: "ratio", title: "Update / parameter norm", family: "update_ratio", log: true,
    label: (i) => `group ${i}` },
  { id: "scalars", title: "Client scalars", family: "scalars", label: (name) => name,
    empty: "no scalars sent (send {\"scalars\": {\"loss\": …}} with a step)" },
  { id: "skipped", title: "Skipped steps · non-finite gradient values",
    fields: ["skipped", "nonfinite"] },
  { id: "rate", title: "Steps per second", derived: "rate" },
];
const FIELDS = "n,time,skipped,nonfinite,lr,grad_norm,update_norm,update_ratio,scalars";

const $ = (id) => document.getElementById(id);
// what the browser test reads (tests/integration/test_ui_browser.py); plots: chart id -> its
// uPlot (the test compares plot.data, what is drawn, with the server's history)
const state = {
  key: sessionStorage.getItem(KEY), sessions: [], selected: null, lastN: null, rows: 0,
  points: 0, charts: {}, plots: {}, draws: 0, polls: 0, errors: [], ready: false,
};
window.__ui = state;
let data = null; // {x: [], time: [], cols: {name: {min: [], max: []}}}
let charts = {}; // id -> {plot, key, el}
let pollTimer = null;
let generation = 0; // bumps on every session change: late answers for another one are dropped

class ApiError extends Error {
  constructor(status, detail) { super(detail); this.status = status; }
}

async function api(path) {
  const headers = { Accept: "application/json" };
  if (state.key) headers.Authorization = `Bearer ${state.key}`;
  const r = await fetch(path, { headers, cache: "no-store" });
  if (!r.ok) {
    const problem = await r.json().catch(() => ({}));
    throw new ApiError(r.status, problem.detail || r.statusText);
  }
  return r.json();
}

function note(err) {
  state.errors.push(String(err && err.message || err));
  $("status").textContent = `⚠ ${err.message || err}`;
}

// ------------------------------------------------------------------ key and session list
async function start() {
  try {
    await loadSessions();
  } catch (err) {
    if (err.status === 401) {
      showLogin(state.key ? "That key is not valid." : "");
      return;
    }
    note(err);
  }
  $("login").hidden = true;
  $("main").hidden = false;
  $("forget").hidden = !state.key;
  state.ready = true;
  setInterval(() => loadSessions().catch(note), LIST_MS);
  const wanted = decodeURIComponent(location.hash.slice(1));
  if (wanted) select(wanted);
}

function showLogin(message) {
  $("main").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message;
  $("key").focus();
}

$("login").addEventListener("submit", (ev) => {
  ev.preventDefault();
  state.key = $("key").value.trim();
  sessionStorage.setItem(KEY, state.key);
  start();
});
$("forget").addEventListener("click", () => {
  sessionStorage.removeItem(KEY);
  location.hash = "";
  location.reload();
});
window.addEventListener("hashchange", () => {
  const wanted = decodeURIComponent(location.hash.slice(1));
  if (wanted && wanted !== state.selected) select(wanted);
});

async function loadSessions() {
  const body = await api("/v1/sessions");
  state.sessions = body.sessions.map((s) => s.id);
  const tbody = $("sessions").querySelector("tbody");
  tbody.replaceChildren(...body.sessions.map((s) => {
    const tr = document.createElement("tr");
    tr.dataset.id = s.id;
    tr.className = s.id === state.selected ? "selected" : "";
    for (const [text, cls] of [[s.id, ""], [s.optimizer, ""], [String(s.step), "num"]]) {
      const td = document.createElement("td");
      td.textContent = text;
      td.title = text;
      if (cls) td.className = cls;
      tr.append(td);
    }
    tr.addEventListener("click", () => { location.hash = encodeURIComponent(s.id); });
    return tr;
  }));
  $("count").textContent = `(${body.sessions.length})`;
  $("no-sessions").hidden = body.sessions.length > 0;
}

// ------------------------------------------------------------------ one session
async function select(id) {
  generation += 1;
  const mine = generation;
  state.selected = id;
  state.lastN = null;
  state.rows = 0;
  clearTimeout(pollTimer);
  for (const tr of $("sessions").querySelectorAll("tbody tr")) {
    tr.className = tr.dataset.id === id ? "selected" : "";
  }
  $("pick").hidden = true;
  $("session").hidden = false;
  $("title").textContent = id;
  $("facts").textContent = "";
  $("status").textContent = "loading…";
  destroyCharts();
  try {
    const info = await api(`/v1/sessions/${encodeURIComponent(id)}`);
    if (mine !== generation) return;
    const groups = info.param_groups.length;
    $("facts").textContent = `${info.optimizer} · ${groups} group${groups === 1 ? "" : "s"} · ` +
      `${info.device} · metrics ${info.metrics ? "on" : "off"} · history ${info.history} rows`;
    await refetch(mine);
  } catch (err) {
    if (mine !== generation) return;
    destroyCharts();
    if (err.status === 404) {
      $("status").textContent = `No session ${id} here.`;
      return;
    }
    note(err);
  }
  if (mine === generation) pollTimer = setTimeout(() => poll(mine), POLL_MS);
}

function width() {
  return Math.max(200, Math.min(1200, $("charts").clientWidth || 800));
}

async function history(id, since) {
  const q = new URLSearchParams({ fields: FIELDS, points: String(Math.round(width() / 2)) });
  if (since !== null) q.set("since", String(since));
  return api(`/v1/sessions/${encodeURIComponent(id)}/history?${q}`);
}

// all of it again, downsampled to about one point per two pixels
async function refetch(mine) {
  const body = await history(state.selected, null);
  if (mine !== generation) return;
  data = { x: [], time: [], cols: {} };
  append(body);
  render();
}

async function poll(mine) {
  if (mine !== generation) return;
  try {
    const body = await history(state.selected, state.lastN);
    if (mine !== generation) return;
    state.polls += 1;
    if (body.last !== null && state.lastN !== null && body.last < state.lastN) {
      await refetch(mine); // the session was replaced
    } else if (body.rows > 0) {
      append(body);
      if (data.x.length > 2 * Math.round(width() / 2)) await refetch(mine);
      else render();
    }
  } catch (err) {
    if (mine !== generation) return;
    if (err.status === 404) { $("status").textContent = "This session is gone."; return; }
    note(err);
  }
  if (mine === generation) pollTimer = setTimeout(() => poll(mine), POLL_MS);
}

function append(body) {
  const c = body.columns;
  const count = c["n.max"].length;
  const seen = data.x.length;
  // downsampled (the page always asks for points): the fields are "<name>.min", "<name>.max"
  const names = new Set(body.fields.map((f) => f.replace(/\.(min|max)$/, "")));
  for (const name of names) {
    if (name === "n" || name === "time") continue;
    if (!data.cols[name]) {
      data.cols[name] = { min: new Array(seen).fill(null), max: new Array(seen).fill(null) };
    }
  }
  for (const [name, col] of Object.entries(data.cols)) {
    const lo = c[`${name}.min`], hi = c[`${name}.max`];
    for (let i = 0; i < count; i++) {
      col.min.push(lo ? num(lo[i]) : null);
      col.max.push(hi ? num(hi[i]) : null);
    }
  }
  data.x.push(...c["n.max"]);
  data.time.push(...c["time.max"]);
  state.rows += body.rows;
  if (body.last !== null) state.lastN = Math.max(state.lastN ?? 0, c["n.max"].at(-1) ?? 0);
  state.points = data.x.length;
}

// {"$float": "inf"} and null (absent) from the JSON encoding
function num(v) {
  if (v === null || typeof v === "number") return v;
  return null; // infinities cannot be drawn
}

// ------------------------------------------------------------------ charts
function seriesOf(spec) {
  if (spec.derived === "rate") return [{ label: "steps/s", values: rate() }];
  if (spec.fields) {
    return spec.fields.filter((f) => data.cols[f]).map((f) => ({ label: f, col: data.cols[f] }));
  }
  const prefix = `${spec.family}.`;
  return Object.keys(data.cols).filter((k) => k.startsWith(prefix))
    .map((k) => ({ label: spec.label(k.slice(prefix.length)), col: data.cols[k] }));
}

// steps per second over a window of about 2% of the points
function rate() {
  const k = Math.max(1, Math.round(data.x.length / 50));
  return data.x.map((n, i) => {
    const j = Math.max(0, i - k);
    const dt = data.time[i] - data.time[j];
    return i > 0 && dt > 0 ? (n - data.x[j]) / dt : null;
  });
}

function positive(values) {
  return values.map((v) => (v !== null && v > 0 ? v : null));
}

function render() {
  const w = width();
  const cols = Math.max(1, Math.floor(w / 430));
  const chartW = Math.floor((w - 12 * (cols - 1)) / cols) - 18;
  let drawn = 0;
  for (const spec of CHARTS) {
    const series = seriesOf(spec);
    const key = `${series.map((s) => s.label).join("|")}@${chartW}`;
    let entry = charts[spec.id];
    if (!entry) {
      const el = document.createElement("div");
      el.className = "chart";
      el.dataset.chart = spec.id;
      const h = document.createElement("h3");
      h.textContent = spec.title;
      el.append(h);
      $("charts").append(el);
      entry = charts[spec.id] = { el, plot: null, key: "" };
    }
    const hasData = series.some((s) => (s.values || s.col.max).some((v) => v !== null));
    if (!hasData) {
      entry.plot?.destroy();
      entry.plot = null;
      entry.key = "";
      if (!entry.el.querySelector(".empty")) {
        const p = document.createElement("div");
        p.className = "empty";
        p.textContent = spec.empty || "no data yet";
        entry.el.append(p);
      }
      state.charts[spec.id] = { series: 0, points: 0 };
      delete state.plots[spec.id];
      continue;
    }
    entry.el.querySelector(".empty")?.remove();
    const rows = [data.x];
    for (const s of series) {
      if (s.values) rows.push(spec.log ? positive(s.values) : s.values);
      else {
        rows.push(spec.log ? positive(s.col.max) : s.col.max);
        rows.push(spec.log ? positive(s.col.min) : s.col.min);
      }
    }
    if (entry.key !== key) {
      entry.plot?.destroy();
      entry.plot = new uPlot(options(spec, series, chartW), rows, entry.el);
      entry.key = key;
    } else {
      entry.plot.setData(rows);
    }
    drawn += 1;
    state.charts[spec.id] = { series: series.length, points: data.x.length };
    state.plots[spec.id] = entry.plot;
  }
  state.draws += 1;
  const last = rate().filter((v) => v !== null).at(-1);
  $("status").textContent = `${state.rows} step${state.rows === 1 ? "" : "s"} read · ` +
    `last n ${state.lastN ?? "–"} · ${data.x.length} points` +
    (last ? ` · ${last.toFixed(1)} steps/s` : "") + ` · ${drawn} charts`;
}

function options(spec, series, w) {
  const s = [{ label: "n" }];
  const bands = [];
  series.forEach((one, i) => {
    const color = COLORS[i % COLORS.length];
    if (one.values) {
      s.push({ label: one.label, stroke: color, width: 1.5, spanGaps: true, points: { show: false } });
      return;
    }
    const at = s.length;
    s.push({ label: one.label, stroke: color, width: 1.5, spanGaps: true, points: { show: false } });
    s.push({ label: `${one.label} (min)`, stroke: color, width: 0.5, spanGaps: true,
      points: { show: false } });
    bands.push({ series: [at, at + 1], fill: `${color}26` });
  });
  return {
    width: w, height: 190, series: s, bands,
    scales: { x: { time: false }, y: spec.log ? { distr: 3 } : {} },
    axes: [{ size: 30 }, { size: 60, values: (u, ticks) => ticks.map(fmt) }],
    legend: { show: true, live: false },
    cursor: { drag: { x: true, y: false } },
    hooks: {
      // the min series are the lower edges of the bands: not in the legend (found by label:
      // a legend that is not live has no row for the x series, so rows and series are not
      // aligned by index)
      init: [(u) => {
        for (const row of u.root.querySelectorAll(".u-legend .u-series")) {
          const label = row.querySelector(".u-label")?.textContent ?? "";
          if (label.endsWith("(min)")) row.style.display = "none";
        }
      }],
    },
  };
}

function fmt(v) {
  if (v === null || v === undefined) return "";
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(1);
  return String(+v.toPrecision(4));
}

function destroyCharts() {
  for (const entry of Object.values(charts)) {
    entry.plot?.destroy();
    entry.el.remove();
  }
  charts = {};
  state.charts = {};
  state.plots = {};
  data = null;
}

let resizeTimer = null;
window.addEventListener("resize", () => {
  clearTimeout(resizeTimer);
  resizeTimer = setTimeout(() => { if (data) render(); }, 150);
});

start();
