// Atom Mask Editor widget: a heat-map of the atoms on the "Atom Mask Editor" node. Click toggles
// an atom, drag paints, a row label toggles a layer; density slider, top-k and buttons select by
// importance (the measured effect when the atoms have one, else the weight norm; the status line
// says which). The selection lives in the node's "mask" and "density" inputs, so it is saved with
// the workflow and a re-queue re-runs only what depends on it. Nothing is written to them before
// the table is known. The last table is kept with the node (small tables in node.properties,
// every table's id too; the server serves larger ones), so a reloaded page shows it again
// without re-running anything.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { AtomMaskState } from "./atom_mask_state.js";
import { HeatmapView } from "./atom_heatmap.js";

const NODE = "SparseAtoms_MaskEditor";
const DEFAULT_SIZE = [520, 440];  // node width, height in graph units
const TABLE_PROPERTY = "sparse_atoms_table";  // the last table, when small enough
const TABLE_ID_PROPERTY = "sparse_atoms_table_id";  // its id on the server (nodes/routes.py)
const PROPERTY_LIMIT = 256 * 1024;  // characters of JSON kept in the workflow at most

function element(tag, attributes = {}, style = {}) {
  const node = document.createElement(tag);
  Object.assign(node, attributes);
  Object.assign(node.style, style);
  return node;
}

function number(value) {
  return value === null || value === undefined ? "not measured" : value.toPrecision(4);
}

/** The table without the per-run "kept" flags (the widget derives them from the mask). */
function storable(table) {
  return { ...table, layers: table.layers.map(({ kept, ...row }) => row) };
}

class AtomMaskEditor {
  constructor(node) {
    this.node = node;
    this.state = new AtomMaskState();
    this.maskWidget = node.widgets.find((w) => w.name === "mask");
    this.densityWidget = node.widgets.find((w) => w.name === "density");
    this.listeners = [];
    this.tableId = null;
    this.tableSource = "none"; // none | fetching | missing | known
    this.frame = null;
    this.build();
    this.watchWidgets();
    this.state.loadMask(this.maskWidget?.value ?? "", Number(this.densityWidget?.value ?? 1));
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
    this.buttons = {};
    for (const name of ["all", "none", "invert", "reset"]) {
      const button = element("button", { textContent: name, className: `sparse-atoms-${name}` },
        { padding: "1px 6px", background: "var(--comfy-input-bg)", color: "inherit",
          border: "1px solid var(--border-color, #555)", borderRadius: "3px", cursor: "pointer" });
      button.addEventListener("click", () => (name === "reset" ? this.reset() : this.edit(() => this.state[name]())));
      this.buttons[name] = button;
    }
    bar.append(element("span", { textContent: "density" }), this.slider, this.topk, ...Object.values(this.buttons));
    this.canvas = element("canvas", { className: "sparse-atoms-heatmap" },
      { flex: "1 1 auto", width: "100%", minHeight: "120px", cursor: "crosshair", borderRadius: "3px" });
    this.status = element("div", { className: "sparse-atoms-status" }, { whiteSpace: "normal", overflow: "hidden" });
    this.tooltip = element("div", { className: "sparse-atoms-tooltip" }, {
      position: "fixed", pointerEvents: "none", display: "none", zIndex: 10000, padding: "3px 6px",
      background: "var(--comfy-menu-bg, #333)", border: "1px solid var(--border-color, #555)",
      borderRadius: "3px", font: "11px monospace", whiteSpace: "pre",
    });
    box.append(bar, this.canvas, this.status);
    document.body.append(this.tooltip);
    this.view = new HeatmapView(this.canvas);

    this.slider.addEventListener("input", () => this.edit(() => { this.state.density = Number(this.slider.value); }));
    this.topk.addEventListener("change", () => {
      const k = Math.floor(Number(this.topk.value));
      if (Number.isFinite(k) && k >= 0) this.edit(() => this.state.topK(k));
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

  /** Typing into the mask or density input updates the selection (callbacks wrapped, not replaced). */
  watchWidgets() {
    for (const widget of [this.maskWidget, this.densityWidget]) {
      if (!widget) continue;
      const callback = widget.callback;
      const editor = this;
      widget.callback = function () {
        const result = callback?.apply(this, arguments);
        if (!editor.committing) editor.syncFromWidgets();
        return result;
      };
    }
  }

  cellAt(event) {
    const rect = this.canvas.getBoundingClientRect();
    return this.view.hit(event.clientX - rect.left, event.clientY - rect.top, this.state.table);
  }

  pointerDown(event) {
    const hit = this.cellAt(event);
    if (!hit || !this.state.editable) return;
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
    this.canvas.setPointerCapture?.(event.pointerId);  // a drag keeps painting outside the canvas
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
      : `${row.label}[${row.atoms[hit.c]}]  effect ${number(row.effect?.[hit.c])}` +
        `  weight norm ${number(row.weight_norm[hit.c])}\n${table.ranked_by}\n${row.key}`;
    this.tooltip.style.left = `${event.clientX + 14}px`;
    this.tooltip.style.top = `${event.clientY + 10}px`;
    this.tooltip.style.display = "block";
  }

  /** Apply a change and write it, only when the table is known and the mask fits it. */
  edit(change) {
    if (!this.state.editable) { this.render(); return; }
    change();
    this.commit();
  }

  /** Forget the mask: allowed without a table only to clear a mask that cannot be read. */
  reset() {
    if (!this.state.table && !this.state.maskError) return;
    this.state.reset();
    this.write("", 1.0);
  }

  /** Write the selection into the node's inputs (saved with the workflow) and redraw. */
  commit() {
    if (!this.state.editable) { this.render(); return; }
    this.write(this.state.maskText(), this.state.density);
  }

  write(mask, density) {
    this.committing = true;
    try {
      if (this.maskWidget) {
        this.maskWidget.value = mask;
        this.maskWidget.callback?.(mask);
      }
      if (this.densityWidget) {
        this.densityWidget.value = density;
        this.densityWidget.callback?.(density);
      }
    } finally {
      this.committing = false;
    }
    this.changed();
  }

  /** Tell the frontend the node changed, so the open workflow is stored (and survives a reload). */
  changed() {
    this.node.setDirtyCanvas?.(true, true);
    app.canvas?.emitBeforeChange?.();
    app.canvas?.emitAfterChange?.();
    this.render();
  }

  /** A table from the node's run (persist: store it with the node) or from storage. */
  setTable(table, { persist = true } = {}) {
    if (!table) return;
    this.state.setTable(table);
    this.tableId = table.id ?? null;
    this.tableSource = "known";
    if (persist) this.changed(); else this.render();
  }

  /** The table's id, and the table itself when small enough, go into the saved workflow. */
  serialize(data) {
    if (!this.state.table) {
      if (this.tableId) data.properties = { ...data.properties, [TABLE_ID_PROPERTY]: this.tableId };
      return;
    }
    const properties = { ...data.properties, [TABLE_ID_PROPERTY]: this.tableId };
    const text = JSON.stringify(storable(this.state.table));
    if (text.length <= PROPERTY_LIMIT) properties[TABLE_PROPERTY] = JSON.parse(text);
    data.properties = properties;
  }

  /** A saved workflow: its mask and density, and the table kept with the node or on the server. */
  configure(info) {
    this.syncFromWidgets();
    const properties = info?.properties ?? {};
    delete this.node.properties?.[TABLE_PROPERTY];  // kept here, written back by serialize()
    delete this.node.properties?.[TABLE_ID_PROPERTY];
    if (properties[TABLE_PROPERTY]) {
      this.setTable(properties[TABLE_PROPERTY], { persist: false });
    } else if (properties[TABLE_ID_PROPERTY]) {
      this.fetchTable(properties[TABLE_ID_PROPERTY]);
    }
  }

  async fetchTable(id) {
    this.tableId = id;
    this.tableSource = "fetching";
    this.render();
    let table = null;
    try {
      const response = await api.fetchApi(`/sparse_atoms/atom_table/${encodeURIComponent(id)}`);
      if (response.ok) table = await response.json();
    } catch (error) {
      console.warn("Atom Mask Editor: could not fetch the atom table", error);
    }
    if (this.tableSource !== "fetching" || this.tableId !== id) return;  // a run sent a newer one
    if (table) this.setTable(table, { persist: false });
    else { this.tableSource = "missing"; this.render(); }
  }

  /** The mask or density changed outside the widget (typed, or a workflow was loaded). */
  syncFromWidgets() {
    const mask = this.maskWidget?.value ?? "";
    const density = Number(this.densityWidget?.value ?? 1);
    const current = this.state.editable ? this.state.maskText() : null;
    if (mask !== current || density !== this.state.density) {
      this.state.loadMask(mask, density);
      this.render();
    }
  }

  statusText() {
    const state = this.state;
    if (state.problem) return `${state.problem}: press reset to clear it.`;
    if (!state.table) {
      const saved = this.maskWidget?.value ? " The saved mask is kept as it is." : "";
      if (this.tableSource === "fetching") return `Loading this node's atom table...${saved}`;
      if (this.tableSource === "missing") {
        return `This node's atom table is no longer on the server: queue the graph once.${saved}`;
      }
      return `No atoms yet: queue the graph once.${saved}`;
    }
    const { kept, total, share } = state.summary();
    const kind = state.table.importance_kind ?? "importance";
    return `${kept} / ${total} atoms kept · ${(100 * share).toFixed(1)}% of the total ${kind} · ` +
      `${state.table.ranked_by ?? ""}`;
  }

  /** Status and controls now; the canvas at most once per frame. */
  render() {
    const state = this.state;
    this.slider.value = String(state.density);
    this.slider.disabled = this.topk.disabled = !state.editable;
    for (const [name, button] of Object.entries(this.buttons)) {
      button.disabled = name === "reset" ? !(state.table || state.maskError) : !state.editable;
    }
    this.status.textContent = this.statusText();
    this.status.title = state.table?.effects || "";
    if (this.frame === null) {
      this.frame = requestAnimationFrame(() => { this.frame = null; this.draw(); });
    }
  }

  draw() {
    this.view.draw(this.state);
  }

  destroy() {
    for (const [name, listener] of this.listeners) window.removeEventListener(name, listener);
    this.listeners = [];
    if (this.frame !== null) cancelAnimationFrame(this.frame);
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
    const onSerialize = nodeType.prototype.onSerialize;
    nodeType.prototype.onSerialize = function (data) {
      onSerialize?.apply(this, arguments);
      this.atomMaskEditor?.serialize(data);
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function (info) {
      const result = onConfigure?.apply(this, arguments);
      this.atomMaskEditor?.configure(info);
      return result;
    };
    const onRemoved = nodeType.prototype.onRemoved;
    nodeType.prototype.onRemoved = function () {
      this.atomMaskEditor?.destroy();
      return onRemoved?.apply(this, arguments);
    };
  },
});
