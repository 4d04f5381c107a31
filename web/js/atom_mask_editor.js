// Atom Mask Editor widget: a heat-map of the atoms on the "Atom Mask Editor" node. Click toggles
// an atom, drag paints, a row label toggles a layer; density slider, top-k and buttons select by
// importance. The selection lives in the node's "mask" and "density" inputs, so it is saved with
// the workflow and a re-queue re-runs only what depends on it.

import { app } from "../../scripts/app.js";
import { AtomMaskState } from "./atom_mask_state.js";
import { HeatmapView } from "./atom_heatmap.js";

const NODE = "SparseAtoms_MaskEditor";
const DEFAULT_SIZE = [520, 440];  // node width, height in graph units

function element(tag, attributes = {}, style = {}) {
  const node = document.createElement(tag);
  Object.assign(node, attributes);
  Object.assign(node.style, style);
  return node;
}

class AtomMaskEditor {
  constructor(node) {
    this.node = node;
    this.state = new AtomMaskState();
    this.maskWidget = node.widgets.find((w) => w.name === "mask");
    this.densityWidget = node.widgets.find((w) => w.name === "density");
    this.listeners = [];
    this.build();
    this.state.loadMask(this.maskWidget?.value ?? "", this.densityWidget?.value ?? 1);
    this.render();
  }

  build() {
    const box = element("div", { className: "sparse-atoms-editor" }, {
      display: "flex", flexDirection: "column", gap: "4px", width: "100%", height: "100%",
      color: "var(--input-text, #ddd)", font: "11px sans-serif", boxSizing: "border-box",
    });
    const bar = element("div", {}, { display: "flex", gap: "4px", alignItems: "center", flexWrap: "wrap" });
    this.slider = element("input", { type: "range", min: "0", max: "1", step: "0.01", title: "density" },
      { flex: "1 1 80px", minWidth: "60px" });
    this.topk = element("input", { type: "number", min: "0", placeholder: "top-k", title: "keep the k most important atoms" },
      { width: "56px", background: "var(--comfy-input-bg)", color: "inherit", border: "1px solid var(--border-color, #555)" });
    const buttons = ["all", "none", "invert", "reset"].map((name) => {
      const button = element("button", { textContent: name, className: `sparse-atoms-${name}` },
        { padding: "1px 6px", background: "var(--comfy-input-bg)", color: "inherit",
          border: "1px solid var(--border-color, #555)", borderRadius: "3px", cursor: "pointer" });
      button.addEventListener("click", () => this.edit(() => this.state[name]()));
      return button;
    });
    bar.append(element("span", { textContent: "density" }), this.slider, this.topk, ...buttons);
    this.canvas = element("canvas", { className: "sparse-atoms-heatmap" },
      { flex: "1 1 auto", width: "100%", minHeight: "120px", cursor: "crosshair", borderRadius: "3px" });
    this.status = element("div", { className: "sparse-atoms-status" }, { whiteSpace: "nowrap", overflow: "hidden" });
    this.tooltip = element("div", { className: "sparse-atoms-tooltip" }, {
      position: "fixed", pointerEvents: "none", display: "none", zIndex: 10000, padding: "3px 6px",
      background: "var(--comfy-menu-bg, #333)", border: "1px solid var(--border-color, #555)",
      borderRadius: "3px", font: "11px monospace", whiteSpace: "pre",
    });
    box.append(bar, this.canvas, this.status);
    document.body.append(this.tooltip);
    this.view = new HeatmapView(this.canvas);

    this.slider.addEventListener("input", () => {
      this.state.density = Number(this.slider.value);
      this.commit();
    });
    this.topk.addEventListener("change", () => {
      const k = Math.floor(Number(this.topk.value));
      if (Number.isFinite(k) && k >= 0 && this.state.table) this.edit(() => this.state.topK(k));
    });
    this.canvas.addEventListener("pointerdown", (event) => this.pointerDown(event));
    this.canvas.addEventListener("pointermove", (event) => this.pointerMove(event));
    this.canvas.addEventListener("pointerleave", () => { this.view.hover = null; this.tooltip.style.display = "none"; this.render(); });
    const up = () => { if (this.painting !== undefined) { this.painting = undefined; this.commit(); } };
    window.addEventListener("pointerup", up);
    this.listeners.push(["pointerup", up]);
    this.resizeObserver = new ResizeObserver(() => this.render());
    this.resizeObserver.observe(this.canvas);

    this.widget = this.node.addDOMWidget("atom_heatmap", "sparse_atoms_heatmap", box, {
      serialize: false, hideOnZoom: false, getMinHeight: () => 200,
    });
    this.widget.serialize = false;
  }

  cellAt(event) {
    const rect = this.canvas.getBoundingClientRect();
    return this.view.hit(event.clientX - rect.left, event.clientY - rect.top, this.state.table);
  }

  pointerDown(event) {
    const hit = this.cellAt(event);
    if (!hit || this.state.foreignMask) return;
    event.preventDefault();
    event.stopPropagation();
    this.state.materialize();
    const grid = this.state.keptGrid();
    if (hit.label) {
      const anyOn = grid[hit.r].some(Boolean);
      this.state.setLayer(hit.r, !anyOn);
      this.commit();
      return;
    }
    this.painting = !grid[hit.r][hit.c];
    this.state.setAtom(hit.r, hit.c, this.painting);
    this.render();
  }

  pointerMove(event) {
    const hit = this.cellAt(event);
    this.view.hover = hit && !hit.label ? hit : null;
    if (hit && this.painting !== undefined && !hit.label) this.state.setAtom(hit.r, hit.c, this.painting);
    this.showTooltip(event, hit);
    this.render();
  }

  showTooltip(event, hit) {
    const table = this.state.table;
    if (!hit || !table) { this.tooltip.style.display = "none"; return; }
    const row = table.layers[hit.r];
    this.tooltip.textContent = hit.label
      ? `${row.label}  ${row.key}\nclick: toggle the whole layer`
      : `${row.label}[${row.atoms[hit.c]}]  importance ${row.importance[hit.c].toPrecision(4)}\n${row.key}`;
    this.tooltip.style.left = `${event.clientX + 14}px`;
    this.tooltip.style.top = `${event.clientY + 10}px`;
    this.tooltip.style.display = "block";
  }

  edit(change) {
    if (!this.state.table) return;
    change();
    this.commit();
  }

  /** Write the selection into the node's inputs (saved with the workflow) and redraw. */
  commit() {
    if (this.maskWidget) {
      this.maskWidget.value = this.state.maskText();
      this.maskWidget.callback?.(this.maskWidget.value);
    }
    if (this.densityWidget) {
      this.densityWidget.value = this.state.density;
      this.densityWidget.callback?.(this.state.density);
    }
    this.node.setDirtyCanvas?.(true, true);
    this.node.graph?.change?.();
    this.render();
  }

  setTable(table) {
    if (!table) return;
    this.state.setTable(table);
    this.render();
  }

  /** The mask or density changed outside the widget (typed, or a workflow was loaded). */
  syncFromWidgets() {
    const mask = this.maskWidget?.value ?? "";
    const density = Number(this.densityWidget?.value ?? 1);
    if (mask !== this.state.maskText() || density !== this.state.density) {
      this.state.loadMask(mask, density);
      this.render();
    }
  }

  render() {
    this.slider.value = String(this.state.density);
    this.view.draw(this.state);
    const summary = this.state.summary();
    if (this.state.foreignMask) {
      this.status.textContent = "This mask was made for other atoms: press reset to clear it.";
    } else if (!summary) {
      this.status.textContent = "No atoms yet: queue the graph once.";
    } else {
      this.status.textContent = `${summary.kept} / ${summary.total} atoms kept · ` +
        `${(100 * summary.share).toFixed(1)}% of total importance`;
    }
  }

  destroy() {
    for (const [name, listener] of this.listeners) window.removeEventListener(name, listener);
    this.listeners = [];
    this.resizeObserver?.disconnect();
    this.tooltip.remove();
  }
}

app.registerExtension({
  name: "SparseAtoms.AtomMaskEditor",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      this.atomMaskEditor = new AtomMaskEditor(this);
      // Room for a readable heat-map from the start (a saved workflow's size still wins).
      this.setSize([Math.max(this.size[0], DEFAULT_SIZE[0]), Math.max(this.size[1], DEFAULT_SIZE[1])]);
      return result;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const result = onExecuted?.apply(this, arguments);
      this.atomMaskEditor?.setTable(message?.atom_table?.[0]);
      return result;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const result = onConfigure?.apply(this, arguments);
      this.atomMaskEditor?.syncFromWidgets();  // a saved workflow's mask and density
      return result;
    };
    const onRemoved = nodeType.prototype.onRemoved;
    nodeType.prototype.onRemoved = function () {
      this.atomMaskEditor?.destroy();
      return onRemoved?.apply(this, arguments);
    };
  },
});
