// The heat-map canvas: layers (rows) x atoms (columns, most important first), colour = the
// importance in use (the measured effect, or the weight norm when the atoms have no effects) on a
// log scale through the same palette as sparse_core/_heatmap.py. One pixel per cell in an
// offscreen image scaled up, so a ~700 x 64 table redraws in a few milliseconds.

const BACKGROUND = [24, 24, 24];
const OFF_DIM = 0.25;

export function colour(value, low, high, palette) {
  if (!(value > 0) || !(high > 0)) return BACKGROUND;
  let t = 1;
  if (high > low && low > 0) {
    t = (Math.log10(Math.max(value, low)) - Math.log10(low)) / (Math.log10(high) - Math.log10(low));
  }
  t = Math.min(1, Math.max(0, t));
  const position = t * (palette.length - 1);
  const i = Math.min(Math.floor(position), palette.length - 2);
  const f = position - i;
  return palette[i].map((a, k) => Math.round(a + (palette[i + 1][k] - a) * f));
}

function themeColour(name, fallback) {
  const value = getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  return value || fallback;
}

/** A layer's name inside its block: ``attn1.to_out.0`` for ``blocks.3.attn1.to_out.0``. */
function withinBlock(row) {
  return row.name.startsWith(`${row.group}.`) ? row.name.slice(row.group.length + 1) : row.name;
}

export class HeatmapView {
  constructor(canvas) {
    this.canvas = canvas;
    this.labelWidth = 64;
    this.offscreen = document.createElement("canvas");
    this.hover = null;
  }

  /** Cell or label under a canvas point: {r, c} | {r, label: true} | null. */
  hit(x, y, table) {
    if (!table || !table.layers.length) return null;
    const { width, height } = this.canvas.getBoundingClientRect();
    const rows = table.layers.length;
    const r = Math.floor((y / height) * rows);
    if (r < 0 || r >= rows) return null;
    if (x < this.labelWidth) return { r, label: true };
    const columns = this.columns(table);
    const c = Math.floor(((x - this.labelWidth) / (width - this.labelWidth)) * columns);
    if (c < 0 || c >= table.layers[r].atoms.length) return null;
    return { r, c };
  }

  columns(table) {
    return Math.max(1, ...table.layers.map((row) => row.atoms.length));
  }

  draw(state) {
    const canvas = this.canvas;
    const ratio = window.devicePixelRatio || 1;
    const { width, height } = canvas.getBoundingClientRect();
    if (width < 2 || height < 2) return;
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.fillStyle = themeColour("--comfy-input-bg", "#222");
    ctx.fillRect(0, 0, width, height);
    const text = themeColour("--input-text", "#ddd");
    const table = state.table;
    if (!table || !table.layers.length) {
      ctx.fillStyle = text;
      ctx.font = "12px sans-serif";
      ctx.fillText("Run the graph to see the atoms of this node's input.", 8, 20);
      return;
    }
    const rows = table.layers.length;
    const columns = this.columns(table);
    this.offscreen.width = columns;
    this.offscreen.height = rows;
    const octx = this.offscreen.getContext("2d");
    const image = octx.createImageData(columns, rows);
    const grid = state.keptGrid();
    table.layers.forEach((row, r) => {
      row.importance.forEach((value, c) => {
        let rgb = colour(value, table.min, table.max, table.palette);
        if (!grid[r][c]) rgb = rgb.map((v) => Math.round(v * OFF_DIM));
        const at = (r * columns + c) * 4;
        image.data[at] = rgb[0]; image.data[at + 1] = rgb[1]; image.data[at + 2] = rgb[2];
        image.data[at + 3] = 255;
      });
    });
    octx.putImageData(image, 0, 0);
    ctx.imageSmoothingEnabled = false;
    // Row labels: every row when there is room, else the first row of each block; the label
    // column is as wide as its longest label, up to a third of the canvas.
    const rowHeight = height / rows;
    const rowLabel = (row) => rowHeight >= 9 ? `${row.label} ${withinBlock(row)}` : row.group;
    ctx.font = `${Math.max(8, Math.min(11, rowHeight - 1))}px sans-serif`;
    const longest = Math.max(...table.layers.map((row) => ctx.measureText(rowLabel(row)).width));
    this.labelWidth = Math.round(Math.min(width / 3, Math.max(48, longest + 6)));
    const cellsWidth = width - this.labelWidth;
    ctx.drawImage(this.offscreen, this.labelWidth, 0, cellsWidth, height);
    ctx.fillStyle = text;
    ctx.textBaseline = "middle";
    let lastY = -Infinity;
    table.layers.forEach((row, r) => {
      const y = (r + 0.5) * rowHeight;
      const first = r === 0 || table.layers[r - 1].group !== row.group;
      if ((rowHeight >= 9 || first) && y - lastY >= 10) {
        ctx.fillText(rowLabel(row), 2, y, this.labelWidth - 4);
        lastY = y;
      }
      if (first && r > 0) {
        ctx.strokeStyle = themeColour("--border-color", "#555");
        ctx.beginPath(); ctx.moveTo(0, r * rowHeight); ctx.lineTo(this.labelWidth, r * rowHeight); ctx.stroke();
      }
    });
    if (this.hover && this.hover.c !== undefined) {
      const cellWidth = cellsWidth / columns;
      ctx.strokeStyle = "#fff";
      ctx.lineWidth = 1;
      ctx.strokeRect(this.labelWidth + this.hover.c * cellWidth, this.hover.r * rowHeight,
        Math.max(2, cellWidth), Math.max(2, rowHeight));
    }
  }
}
