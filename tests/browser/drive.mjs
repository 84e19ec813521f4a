// Drive Debian's chromium with playwright-core for tests/integration/test_browser_cors.py.
//   node drive.mjs '<json list of visits>'   ->  one JSON line on stdout: a result per visit
// A visit is {"url", "kind"}: "result" waits for the page's window.__result (set by
// page/app.mjs); "docs" waits for Swagger UI to render the API's title; "redoc" for ReDoc's.
// Every visit also reports each URL the page requested (and why it failed, when it did: a
// request the page's Content-Security-Policy blocks never leaves the browser), so a test can
// check where it went.
import { chromium } from "playwright-core";

const visits = JSON.parse(process.argv[2]);
const browser = await chromium.launch({
  executablePath: process.env.OPTSERVE_CHROMIUM ?? "/usr/bin/chromium",
  headless: true,
  // as root on a machine with a closed network (see docs in scripts/bootstrap-browser)
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const out = [];
try {
  for (const visit of visits) {
    const page = await browser.newPage();
    const requests = [];
    const errors = [];
    const pending = new Map(); // request -> its entry in requests, until it ends
    page.on("request", (r) => {
      const entry = { url: r.url(), method: r.method() };
      requests.push(entry);
      pending.set(r, entry);
    });
    page.on("requestfinished", (r) => pending.delete(r));
    page.on("requestfailed", (r) => {
      const entry = pending.get(r);
      if (entry) entry.failure = r.failure()?.errorText ?? "failed";
      pending.delete(r);
    });
    page.on("pageerror", (e) => errors.push(String(e)));
    page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
    let value;
    try {
      await page.goto(visit.url, { waitUntil: "load", timeout: 30000 });
      if (visit.kind === "result") {
        const handle = await page.waitForFunction(() => window.__result, null, { timeout: 30000 });
        value = await handle.jsonValue();
      } else if (visit.kind === "docs") {
        value = await page.locator(".swagger-ui .info .title").first().textContent({ timeout: 30000 });
        const ops = await page.locator(".swagger-ui .opblock").count();
        value = { title: value, operations: ops };
      } else {
        const h1 = page.locator("h1").first();
        value = { title: await h1.textContent({ timeout: 30000 }) };
      }
    } catch (e) {
      value = { driverError: String(e) };
    }
    // every request the page made has ended (finished or failed) before we report it
    for (let waited = 0; pending.size && waited < 15000; waited += 50) {
      await new Promise((done) => setTimeout(done, 50));
    }
    for (const entry of pending.values()) entry.failure = "still pending";
    out.push({ url: visit.url, value, requests, errors });
    await page.close();
  }
} finally {
  await browser.close();
}
process.stdout.write(JSON.stringify(out) + "\n");
