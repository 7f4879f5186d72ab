// Shield for ComfyUI: what the shield did, visible in the graph.
// - On every executed Shield node, the text of its UI output (Shield Info, Shield Memory, reports).
// - On each repellency/guidance node, after a run: how many samples and steps it touched
//   (the server sends "shield.run_summary" {node, kind, title, samples, samples_touched, steps, steps_touched,
//   note: a method's sentence on why a run did nothing, e.g. Transition-Point CFG at cfg 1};
//   the title is the method's name from its registered record, so a new method needs no edit here).
// - On Shield Memory, a button that empties the memory now (POST /shield/memory/reset).
// Shield sets built from images show their thumbnails through ComfyUI's own image preview.
// Current frontend API only: window.comfyAPI.app.app, window.comfyAPI.api.api, node.addDOMWidget.

const { app } = window.comfyAPI.app;
const { api } = window.comfyAPI.api;

const NODE_PREFIX = "Shield";
const TEXT_WIDGET = "shield_summary";
const RUN_WIDGET = "shield_run_summary";
const RUN_EVENT = "shield.run_summary";

function summaryText(message) {
  const text = message?.text;
  if (Array.isArray(text)) return text.join("\n");
  return typeof text === "string" ? text : "";
}

function panel(node, name, className) {
  const existing = node.widgets?.find((widget) => widget.name === name);
  if (existing) return existing.element;
  const element = document.createElement("pre");
  element.className = className;
  element.dataset.shieldNode = node.type;
  element.dataset.shieldNodeId = String(node.id);
  Object.assign(element.style, {
    margin: "0",
    padding: "4px 6px",
    whiteSpace: "pre-wrap",
    overflowY: "auto",
    fontSize: "11px",
    lineHeight: "1.3",
    color: "var(--input-text, #ddd)",
    background: "var(--comfy-input-bg, #222)",
    borderRadius: "4px",
  });
  node.addDOMWidget(name, name, element, { serialize: false, hideOnZoom: false });
  return element;
}

function showText(node, name, className, text) {
  panel(node, name, className).textContent = text;
  node.setDirtyCanvas?.(true, true);
}

function findNode(id) {
  const graph = app.graph;
  return graph?.getNodeById?.(id) ?? graph?.getNodeById?.(Number(String(id).split(":").pop())) ?? null;
}

function runSummaryText(detail) {
  const kind = detail.title || detail.kind;
  const samples = `${detail.samples_touched}/${detail.samples} samples`;
  const steps = `${detail.steps_touched}/${detail.steps} steps`;
  const label = detail.label ? `\n(${detail.label})` : "";
  return `${kind}: touched ${samples}, ${steps}` + label + (detail.note ? `\n${detail.note}` : "");
}

function onRunSummary(event) {
  const detail = event.detail;
  const node = detail && findNode(detail.node);
  if (!node) return;
  showText(node, RUN_WIDGET, "shield-run-summary", runSummaryText(detail));
}

function widgetValue(node, name, fallback) {
  return node.widgets?.find((widget) => widget.name === name)?.value ?? fallback;
}

async function resetMemory(node) {
  const memory = {
    memory_id: widgetValue(node, "memory_id", ""),
    store: widgetValue(node, "store", "server"),
    redis_url: widgetValue(node, "redis_url", ""),
  };
  const response = await api.fetchApi("/shield/memory/reset", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(memory),
  });
  const answer = await response.json();
  const text = response.ok ? `memory '${answer.memory_id}' emptied` : `reset failed: ${answer.error}`;
  showText(node, TEXT_WIDGET, "shield-summary", text);
}

app.registerExtension({
  name: "shield.ExecutedSummary",
  async setup() {
    api.addEventListener(RUN_EVENT, onRunSummary);
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith(NODE_PREFIX)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = summaryText(message);
      if (text) showText(this, TEXT_WIDGET, "shield-summary", text);
    };
    if (nodeData.name !== "ShieldMemory") return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      onNodeCreated?.apply(this, arguments);
      const button = this.addWidget("button", "shield_reset_memory", null, () => resetMemory(this));
      button.label = "Reset memory now";
      button.serialize = false;
    };
  },
});
