// The Atom Mask Editor's selection: which atoms are kept, and the mask string saved in the
// workflow. Mirrors nodes/masks.py: kept = top ceil(density * N) by importance AND not switched off.
// The selection is editable only once the table is known and the mask fits it: a state that is
// not loaded never produces a mask string.

export const MASK_VERSION = 1;

/** The mask string's atoms switched off, or the reason it cannot be used (nodes/masks.py). */
function parseMask(text) {
  let data;
  try {
    data = JSON.parse(text);
  } catch (error) {
    return { error: `The mask is not valid JSON (${error.message})` };
  }
  if (!data || typeof data !== "object" || Array.isArray(data) || data.version !== MASK_VERSION) {
    return { error: `The mask is not a version-${MASK_VERSION} mask object` };
  }
  if (typeof data.fingerprint !== "string") return { error: "The mask has no fingerprint" };
  const off = new Map();
  const listing = data.off ?? {};
  if (typeof listing !== "object" || Array.isArray(listing)) {
    return { error: "The mask's 'off' must map layer keys to lists of atom ids" };
  }
  for (const [key, ids] of Object.entries(listing)) {
    if (!Array.isArray(ids) || !ids.every(Number.isInteger)) {
      return { error: `The mask's entry for ${key} is not a list of atom ids` };
    }
    off.set(key, new Set(ids));
  }
  return { fingerprint: data.fingerprint, off };
}

export class AtomMaskState {
  constructor() {
    // {id, fingerprint, importance_kind, ranked_by, effects, min, max, total, palette,
    //  layers: [{key, label, name, group, atoms, importance, effect, weight_norm}]}
    this.table = null;
    this.off = new Map(); // layer key -> Set of atom ids switched off
    this.density = 1.0;
    this.maskFingerprint = null;
    this.maskError = null; // why the saved mask string cannot be read
    this.problem = null; // why the mask cannot be edited (unreadable, or for other atoms)
  }

  setTable(table) {
    this.table = table;
    this.ranking = [];
    table.layers.forEach((row, r) =>
      row.importance.forEach((value, c) => this.ranking.push({ r, c, value })));
    // Same order as SparseAtoms.ranking(): importance, then layer, then position (stable).
    this.ranking.sort((a, b) => b.value - a.value || a.r - b.r || a.c - b.c);
    this.total = this.ranking.length;
    this.totalImportance = this.ranking.reduce((s, x) => s + x.value, 0);
    this.checkMask();
  }

  loadMask(text, density) {
    this.density = density;
    this.off = new Map();
    this.maskFingerprint = null;
    this.maskError = null;
    if (text && text.trim()) {
      const parsed = parseMask(text);
      if (parsed.error) this.maskError = parsed.error;
      else ({ fingerprint: this.maskFingerprint, off: this.off } = parsed);
    }
    this.checkMask();
  }

  checkMask() {
    this.problem = this.maskError;
    if (this.problem || !this.table) return;
    if (this.maskFingerprint && this.maskFingerprint !== this.table.fingerprint) {
      this.problem = "This mask was made for other atoms";
      return;
    }
    const rows = new Map(this.table.layers.map((row, r) => [row.key, r]));
    for (const [key, ids] of this.off) {
      const r = rows.get(key);
      const known = r === undefined ? new Set() : new Set(this.table.layers[r].atoms);
      const missing = [...ids].find((id) => !known.has(id));
      if (missing !== undefined) {
        const label = r === undefined ? key : `${this.table.layers[r].label}[${missing}]`;
        this.problem = `This mask switches off atoms these atoms do not have (${label})`;
        return;
      }
    }
  }

  /** True when a change can be written: the table is known and the mask fits it. */
  get editable() {
    return Boolean(this.table) && !this.problem;
  }

  maskText() {
    if (!this.editable) throw new Error("the mask cannot be written before its table is known");
    const off = {};
    for (const key of [...this.off.keys()].sort()) {
      const ids = [...this.off.get(key)].sort((a, b) => a - b);
      if (ids.length) off[key] = ids;
    }
    if (!Object.keys(off).length) return "";
    return JSON.stringify({ fingerprint: this.table.fingerprint, off, version: MASK_VERSION });
  }

  /** Grid of kept flags [row][column] for the table's (importance-sorted) columns. */
  keptGrid() {
    const grid = this.table.layers.map((row) => new Array(row.atoms.length).fill(false));
    const limit = Math.ceil(this.density * this.total);
    for (let i = 0; i < limit && i < this.ranking.length; i++) {
      const { r, c } = this.ranking[i];
      grid[r][c] = true;
    }
    this.table.layers.forEach((row, r) => {
      const off = this.off.get(row.key);
      if (off) row.atoms.forEach((id, c) => { if (off.has(id)) grid[r][c] = false; });
    });
    return grid;
  }

  summary() {
    if (!this.table) return null;
    const grid = this.keptGrid();
    let kept = 0, importance = 0;
    grid.forEach((row, r) => row.forEach((on, c) => {
      if (on) { kept += 1; importance += this.table.layers[r].importance[c]; }
    }));
    const share = this.totalImportance > 0 ? importance / this.totalImportance : 0;
    return { kept, total: this.total, share };
  }

  /** Make the current selection explicit in the mask (density 1), so clicks edit exactly it. */
  materialize() {
    const grid = this.keptGrid();
    this.off = new Map();
    this.table.layers.forEach((row, r) => row.atoms.forEach((id, c) => {
      if (!grid[r][c]) this.offSet(row.key).add(id);
    }));
    this.density = 1.0;
  }

  offSet(key) {
    if (!this.off.has(key)) this.off.set(key, new Set());
    return this.off.get(key);
  }

  setAtom(r, c, on) {
    const row = this.table.layers[r];
    const off = this.offSet(row.key);
    if (on) off.delete(row.atoms[c]); else off.add(row.atoms[c]);
  }

  setLayer(r, on) {
    this.table.layers[r].atoms.forEach((_, c) => this.setAtom(r, c, on));
  }

  all() { this.off = new Map(); this.density = 1.0; }
  none() { this.density = 1.0; this.table.layers.forEach((_, r) => this.setLayer(r, false)); }

  /** Forget the mask (also one that is unreadable or for other atoms). */
  reset() {
    this.off = new Map();
    this.density = 1.0;
    this.maskFingerprint = null;
    this.maskError = null;
    this.checkMask();
  }

  invert() {
    const grid = this.keptGrid();
    this.off = new Map();
    this.density = 1.0;
    grid.forEach((row, r) => row.forEach((on, c) => { if (on) this.setAtom(r, c, false); }));
  }

  topK(k) {
    this.density = 1.0;
    this.off = new Map();
    const keep = new Set(this.ranking.slice(0, Math.max(0, k)).map(({ r, c }) => `${r}:${c}`));
    this.table.layers.forEach((row, r) => row.atoms.forEach((_, c) => {
      if (!keep.has(`${r}:${c}`)) this.setAtom(r, c, false);
    }));
  }
}
