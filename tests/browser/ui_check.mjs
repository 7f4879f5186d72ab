// Drives the real ComfyUI frontend in headless Debian Chromium (playwright-core, no browser download).
// Usage: node ui_check.mjs '<json>' where json = {url, screenshot, workflows: [path], expectNodes: [type],
//        runWorkflow: path|null, waitForSelector: css|null}
// Prints one JSON line: {registeredMissing, workflows: [{path, missingTypes}], extensions, selectorFound}.
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";

const require = createRequire(process.env.SHIELD_NODE_MODULES + "/");
const { chromium } = require("playwright-core");
const options = JSON.parse(process.argv[2]);

const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const result = { consoleErrors: [] };
// A fresh user sees the templates browser on top of the graph; mark the tutorial as done.
await fetch(`${options.url}/settings/Comfy.TutorialCompleted`, { method: "POST", body: "true" });
try {
  const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
  page.on("pageerror", (error) => result.consoleErrors.push(String(error)));
  await page.goto(options.url, { waitUntil: "domcontentloaded", timeout: 60000 });
  await page.waitForFunction(
    () => window.comfyAPI?.app?.app?.graph && window.LiteGraph?.registered_node_types?.KSampler, null, { timeout: 60000 });
  result.registeredMissing = await page.evaluate(
    (types) => types.filter((t) => !(t in window.LiteGraph.registered_node_types)), options.expectNodes ?? []);
  result.extensions = await page.evaluate(() => window.comfyAPI.app.app.extensions.map((e) => e.name));
  result.workflows = [];
  for (const path of options.workflows ?? []) {
    const workflow = JSON.parse(readFileSync(path, "utf8"));
    const missingTypes = await page.evaluate(async (wf) => {
      const app = window.comfyAPI.app.app;
      await app.loadGraphData(wf, true, true, "check");
      const types = app.graph._nodes.map((n) => n.type);
      return [...new Set(wf.nodes.map((n) => n.type).filter((t) => !(t in window.LiteGraph.registered_node_types)))]
        .concat(types.length === wf.nodes.length ? [] : [`loaded ${types.length} of ${wf.nodes.length} nodes`]);
    }, workflow);
    result.workflows.push({ path, missingTypes });
  }
  if (options.runWorkflow) {
    const workflow = JSON.parse(readFileSync(options.runWorkflow, "utf8"));
    await page.evaluate(async (wf) => {
      const app = window.comfyAPI.app.app;
      await app.loadGraphData(wf, true, true, "run");
      await app.queuePrompt(0, 1);
    }, workflow);
  }
  if (options.waitForSelector) {
    try {
      await page.waitForSelector(options.waitForSelector, { timeout: options.waitTimeout ?? 120000 });
      result.selectorFound = true;
      result.selectorText = await page.locator(options.waitForSelector).first().innerText();
    } catch (error) {
      result.selectorFound = false;
    }
  }
  if (options.screenshot) await page.screenshot({ path: options.screenshot });
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
