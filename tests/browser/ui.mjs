// Drive the page at /ui in Debian's chromium for tests/integration/test_ui_browser.py.
//   node ui.mjs '<json: {url, key, session, first, screenshot}>'
// Two phases, one JSON line on stdout each:
//   1. open url (the login form), type key, click the row of `session`, wait until the page
//      has read `first` steps; report what the page shows and what its charts hold ("drawn");
//   2. then wait for one line on stdin ({"until": N}: the test stepped the session meanwhile),
//      wait until the page has read N steps without a reload (and the session list says N),
//      save a screenshot and report again ("updated"), with every request the page made and
//      every console error.
// Any failure prints {"driverError": ...} as the line and exits 1.
import { chromium } from "playwright-core";
import { createInterface } from "node:readline";

const cfg = JSON.parse(process.argv[2]);
const TIMEOUT = cfg.timeoutMs ?? 20000;
const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
const say = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");

const browser = await chromium.launch({
  executablePath: process.env.OPTSERVE_CHROMIUM ?? "/usr/bin/chromium",
  headless: true,
  // as root on a machine with a closed network (see scripts/bootstrap-browser)
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
let code = 0;
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT);
  let phase = "login";
  const requests = [];
  const errors = [];
  const pending = new Map();
  let navigations = 0;
  page.on("request", (r) => {
    const entry = { url: r.url(), method: r.method(), phase };
    requests.push(entry);
    pending.set(r, entry);
  });
  page.on("requestfinished", async (r) => {
    const entry = pending.get(r);
    pending.delete(r);
    if (entry) entry.status = (await r.response())?.status() ?? null;
  });
  page.on("requestfailed", (r) => {
    const entry = pending.get(r);
    if (entry) entry.failure = r.failure()?.errorText ?? "failed";
    pending.delete(r);
  });
  page.on("pageerror", (e) => errors.push({ phase, text: String(e) }));
  page.on("console", (m) => {
    if (m.type() === "error" || m.type() === "warning") {
      errors.push({ phase, type: m.type(), text: m.text(), url: m.location()?.url ?? "" });
    }
  });
  page.on("framenavigated", (f) => { if (f === page.mainFrame()) navigations += 1; });

  // what the page shows, and what its charts hold (uPlot's own data, i.e. what is drawn)
  const look = () => page.evaluate((id) => {
    const ui = window.__ui;
    const plots = {};
    for (const [name, plot] of Object.entries(ui.plots)) {
      plots[name] = { labels: plot.series.map((s) => s.label), data: plot.data };
    }
    const canvases = [...document.querySelectorAll("#charts canvas")];
    // painted pixels per canvas: a chart that is there but blank shows 0 (read from a copy:
    // reading a chart's own canvas back twice makes Chromium warn on the console)
    const painted = canvases.map((c) => {
      const copy = document.createElement("canvas");
      copy.width = c.width;
      copy.height = c.height;
      const ctx = copy.getContext("2d", { willReadFrequently: true });
      ctx.drawImage(c, 0, 0);
      const px = ctx.getImageData(0, 0, c.width, c.height).data;
      let n = 0;
      for (let i = 3; i < px.length; i += 4) if (px[i] !== 0) n += 1;
      return n;
    });
    const rows = [...document.querySelectorAll("#sessions tbody tr")].map((tr) => ({
      id: tr.dataset.id, cells: [...tr.cells].map((td) => td.textContent),
      selected: tr.classList.contains("selected"),
    }));
    // per chart, the legend's entries a reader sees
    const legends = {};
    for (const chart of document.querySelectorAll("#charts .chart")) {
      legends[chart.dataset.chart] = [...chart.querySelectorAll(".u-legend .u-series")]
        .filter((row) => getComputedStyle(row).display !== "none")
        .map((row) => row.querySelector(".u-label")?.textContent ?? "");
    }
    return {
      rows, plots, painted, legends, marker: window.__marker ?? null,
      count: document.getElementById("count").textContent,
      title: document.getElementById("title").textContent,
      facts: document.getElementById("facts").textContent,
      status: document.getElementById("status").textContent,
      chartTitles: [...document.querySelectorAll("#charts .chart h3")].map((h) => h.textContent),
      empty: [...document.querySelectorAll("#charts .chart")]
        .filter((c) => c.querySelector(".empty")).map((c) => c.dataset.chart),
      text: document.body.innerText,
      ui: { selected: ui.selected, lastN: ui.lastN, rows: ui.rows, points: ui.points,
            charts: ui.charts, draws: ui.draws, polls: ui.polls, errors: ui.errors },
      sessionKeyStored: sessionStorage.getItem("optserve.key") !== null,
      hash: location.hash, id,
    };
  }, cfg.session);

  try {
    await page.goto(cfg.url, { waitUntil: "load" });
    await page.locator("#login").waitFor({ state: "visible" });
    const mainHiddenAtLogin = await page.locator("#main").isHidden();
    phase = "listed";
    await page.locator("#key").fill(cfg.key);
    await page.locator("#login button[type=submit]").click();
    await page.locator("#main").waitFor({ state: "visible" });
    const row = page.locator(`#sessions tbody tr[data-id="${cfg.session}"]`);
    await row.waitFor({ state: "visible" });
    const listed = await look();
    phase = "drawn";
    await row.click();
    await page.waitForFunction((n) => window.__ui.lastN >= n && window.__ui.plots.lr
      && window.__ui.plots.scalars, cfg.first);
    await page.evaluate(() => { window.__marker = "no reload since"; });
    say({ phase: "drawn", mainHiddenAtLogin, listed, drawn: await look() });

    const next = await lines.next();
    const { until } = JSON.parse(next.value);
    phase = "updated";
    const started = Date.now();
    await page.waitForFunction((n) => window.__ui.lastN >= n, until);
    const seenAfterMs = Date.now() - started;
    // the list refreshes itself every few seconds: its step column catches up too
    await page.waitForFunction(([id, n]) => {
      const tr = document.querySelector(`#sessions tbody tr[data-id="${id}"]`);
      return tr && tr.cells[2].textContent === String(n);
    }, [cfg.session, until]);
    const updated = await look();
    if (cfg.screenshot) await page.screenshot({ path: cfg.screenshot });
    for (let waited = 0; pending.size && waited < 5000; waited += 50) {
      await new Promise((done) => setTimeout(done, 50));
    }
    for (const entry of pending.values()) entry.failure = "still pending";
    say({ phase: "updated", updated, seenAfterMs, navigations, requests, errors });
  } catch (e) {
    code = 1;
    let snapshot = null;
    try { snapshot = await look(); } catch { /* the page itself is gone */ }
    say({ driverError: String(e), phase, snapshot, requests, errors });
  }
} finally {
  await browser.close();
}
process.exit(code);
