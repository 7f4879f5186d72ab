// Drives the real ComfyUI frontend in headless Debian Chromium (playwright-core, no browser download).
// Usage: node ui_check.mjs '<json>' where json = {url, screenshot, workflows: [path], expectNodes: [type],
//        pressButton: {workflow, nodeType, widget, expectSelector, expectText}|null,
//        runWorkflow: path|null, waitForSelector: css|null, waitForText: string|null, waitForPreviewOf: type|null,
//        viewScale: number|null}
// Prints one JSON line: {registeredMissing, workflows: [{path, missingTypes}], extensions, button,
//        selectorFound, selectorText, previews: {nodeType: imageCount}}.
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
  if (options.pressButton) {
    const press = options.pressButton;
    const workflow = JSON.parse(readFileSync(press.workflow, "utf8"));
    result.button = await page.evaluate(async ({ wf, press }) => {
      const app = window.comfyAPI.app.app;
      await app.loadGraphData(wf, true, true, "button");
      const node = app.graph._nodes.find((n) => n.type === press.nodeType);
      const widget = node?.widgets?.find((w) => w.name === press.widget);
      if (!widget) return { found: false };
      await widget.callback?.(widget.value, app.canvas, node);
      return { found: true, label: widget.label ?? widget.name };
    }, { wf: workflow, press });
    if (result.button.found) {
      await page.waitForFunction(({ selector, text }) =>
        [...document.querySelectorAll(selector)].some((e) => e.textContent.includes(text)),
        { selector: press.expectSelector, text: press.expectText }, { timeout: 20000 }).then(
        () => { result.button.effect = true; }, () => { result.button.effect = false; });
    }
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
      await page.waitForFunction(({ selector, text }) =>
        [...document.querySelectorAll(selector)].some((e) => !text || e.textContent.includes(text)),
        { selector: options.waitForSelector, text: options.waitForText ?? "" }, { timeout: options.waitTimeout ?? 120000 });
      result.selectorFound = true;
      result.selectorText = await page.evaluate((selector) =>
        [...document.querySelectorAll(selector)].map((e) => e.textContent).join("\n"), options.waitForSelector);
    } catch (error) {
      result.selectorFound = false;
    }
    if (options.waitForPreviewOf) {  // the run's last node: its images arrive after the run summary
      await page.waitForFunction((type) => {
        const app = window.comfyAPI.app.app;
        const node = app.graph._nodes.find((n) => n.type === type);
        return node && (app.nodeOutputs?.[String(node.id)]?.images ?? []).length > 0;
      }, options.waitForPreviewOf, { timeout: 60000 }).catch(() => {});
    }
    result.previews = await page.evaluate(() => {
      const app = window.comfyAPI.app.app;
      const counts = {};
      for (const node of app.graph._nodes) {
        const images = app.nodeOutputs?.[String(node.id)]?.images ?? node.imgs ?? [];
        if (images.length) counts[node.type] = images.length;
      }
      return counts;
    });
    await page.waitForTimeout(500); // let the canvas draw the last previews before the screenshot
  }
  if (options.viewScale) {
    await page.evaluate((scale) => {
      const canvas = window.comfyAPI.app.app.canvas;
      canvas.ds.scale = scale;
      canvas.ds.offset = [90, 130]; // screen = (graph + offset) * scale: clear the side and top bars
      canvas.setDirty(true, true);
    }, options.viewScale);
    await page.waitForTimeout(300);
  }
  if (options.screenshot) await page.screenshot({ path: options.screenshot });
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
