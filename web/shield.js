// Shield for ComfyUI: shows, on every executed Shield node, the text of its UI output
// (e.g. what a repellency/guidance node did, or Shield Info's status) as a read-only panel.
// Current frontend API only: window.comfyAPI.app.app, node.addDOMWidget, node.onExecuted.

const { app } = window.comfyAPI.app;

const NODE_PREFIX = "Shield";
const WIDGET_NAME = "shield_summary";

function summaryText(message) {
  const text = message?.text;
  if (Array.isArray(text)) return text.join("\n");
  return typeof text === "string" ? text : "";
}

function summaryElement(node) {
  const existing = node.widgets?.find((widget) => widget.name === WIDGET_NAME);
  if (existing) return existing.element;
  const element = document.createElement("pre");
  element.className = "shield-summary";
  element.dataset.shieldNode = node.type;
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
  node.addDOMWidget(WIDGET_NAME, "shield_summary", element, { serialize: false, hideOnZoom: false });
  return element;
}

app.registerExtension({
  name: "shield.ExecutedSummary",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith(NODE_PREFIX)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = summaryText(message);
      if (!text) return;
      summaryElement(this).textContent = text;
      this.setDirtyCanvas?.(true, true);
    };
  },
});
