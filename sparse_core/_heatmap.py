"""The importance table and its heat-map picture: layers (rows) x atoms (columns, most important
first), colour = importance on a log scale. Importance is the atoms' one kind
(:attr:`SparseAtoms.importance_kind`): the measured effect when every layer has one, else the
weight norm; the table says which, and carries both values per atom. The Atom Mask Editor widget
draws the same table with the same palette, so a saved image tells the same story as the widget.
"""

from __future__ import annotations

import math
import re

import torch

from ._atoms import SparseAtoms

__all__ = ["PALETTE", "describe_effects", "importance_table", "importance_heatmap", "short_layer_name"]

# Viridis at five stops; colours between stops are interpolated linearly (the widget does too).
PALETTE = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]
BACKGROUND = (24, 24, 24)  # zero importance
_OFF_DIM = 0.25  # masked-off atoms keep a quarter of their colour


def short_layer_name(key: str) -> str:
    """A layer key without the ``diffusion_model.`` prefix, with long block paths kept whole."""
    return re.sub(r"^diffusion_model\.", "", key)


def _group(key: str) -> str:
    """The block a layer belongs to, for grouping rows (``blocks.3``, ``input_blocks.4.1``...)."""
    parts = short_layer_name(key).split(".")
    digits = [i for i, p in enumerate(parts) if p.isdigit()]
    return ".".join(parts[: digits[-1] + 1]) if digits else parts[0]


def importance_table(atoms: SparseAtoms, kept: dict[str, set[int]] | None = None) -> dict:
    """A JSON-ready table of every atom, ranked by the one importance the atoms use.

    Per layer: its key, label ``L{n}``, short name, group, and its atoms sorted by importance
    (most important first): ``atoms`` (ids), ``importance`` (the kind in use), ``effect`` (the
    measured effect, or None per atom when the layer has none), ``weight_norm`` (``|s|·‖d‖·‖c‖``),
    and ``kept`` flags (atom ids still in the mask; all when ``kept`` is None).

    Table level: ``importance_kind`` (``"effect"`` or ``"weight norm"``, see
    :attr:`SparseAtoms.importance_kind`), ``ranked_by`` (one phrase for people: which importance
    ranks the atoms and, for the weight norm, why), ``effects`` (how the effects were measured,
    from ``atoms.info.effects``; ``""`` when none are used), and ``min``/``max``/``total`` of the
    positive importances for the colour scale.
    """
    kind = atoms.importance_kind
    importance = atoms.importance()
    rows, positive = [], []
    for number, (key, layer) in enumerate(atoms.layers.items()):
        values = importance[key].detach().double().cpu()
        order = torch.sort(-values, stable=True).indices
        ids = layer.index.cpu()[order].tolist()
        ranked = values[order].tolist()
        positive += [v for v in ranked if v > 0]
        effect = ([None] * len(ids) if layer.effect is None
                  else layer.importance().detach().double().cpu()[order].tolist())
        keep = kept.get(key) if kept is not None else None
        rows.append({
            "key": key, "label": f"L{number}", "name": short_layer_name(key), "group": _group(key),
            "atoms": ids, "importance": ranked, "effect": effect,
            "weight_norm": layer.weight_norm().detach().double().cpu()[order].tolist(),
            "kept": [True] * len(ids) if keep is None else [i in keep for i in ids],
        })
    return {
        "fingerprint": atoms.fingerprint(),
        "layers": rows,
        "importance_kind": kind,
        "ranked_by": _ranked_by(atoms),
        "effects": describe_effects(atoms.info.effects) if kind == "effect" else "",
        "max": max(positive, default=0.0),
        "min": min(positive, default=0.0),
        "total": float(sum(positive)),
        "palette": PALETTE,
    }


def _ranked_by(atoms: SparseAtoms) -> str:
    """Which importance ranks ``atoms``, in words (the widget, node text and image all use it)."""
    if atoms.importance_kind == "effect":
        return "ranked by measured effect"
    with_atoms = [layer for layer in atoms.layers.values() if layer.n_atoms]
    measured = sum(layer.effect is not None for layer in with_atoms)
    if measured:
        return (f"ranked by weight norm (effects measured in only {measured} of {len(with_atoms)} "
                "layers)")
    return "ranked by weight norm (no measured effects in these atoms)"


def describe_effects(effects: dict) -> str:
    """A short description of how effects were measured, from ``AtomsInfo.effects`` (e.g. method
    ``"jacobian probes + exact ablation of top 16"``, calibration, metric, seconds)."""
    if not effects:
        return "how these effects were measured is not recorded"
    parts = [_short(effects.get("method") or "measured")]
    if effects.get("calibration"):
        parts.append(f"on {_short(effects['calibration'])}")
    if effects.get("metric"):
        parts.append(f"({_short(effects['metric'])})")
    seconds = effects.get("seconds")
    if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and math.isfinite(seconds):
        parts.append(f"in {seconds:.3g} s")
    return " ".join(parts)


_DESCRIPTION_LIMIT = 200  # characters of one field a description shows (a file may hold any)


def _short(value) -> str:
    """``str(value)``, cut to :data:`_DESCRIPTION_LIMIT` characters with an ellipsis."""
    text = str(value)
    if len(text) <= _DESCRIPTION_LIMIT:
        return text
    return text[:_DESCRIPTION_LIMIT - 1] + f"… ({len(text)} characters)"


def colours(values: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """RGB ``(..., 3)`` float for importances ``values (...)``: log scale between ``low`` and
    ``high`` through :data:`PALETTE`; zero importance gets :data:`BACKGROUND`."""
    palette = torch.tensor(PALETTE, dtype=torch.float64)
    values = values.double()
    if high > low > 0:
        t = (values.clamp_min(low).log10() - math.log10(low)) / (math.log10(high) - math.log10(low))
    else:
        t = torch.ones_like(values)
    position = t.clamp(0, 1) * (len(PALETTE) - 1)
    index = position.floor().long().clamp(max=len(PALETTE) - 2)
    fraction = (position - index)[..., None]
    rgb = palette[index] * (1 - fraction) + palette[index + 1] * fraction
    return torch.where((values > 0)[..., None], rgb, torch.tensor(BACKGROUND, dtype=torch.float64))


def importance_heatmap(table: dict, *, max_width: int = 1024, max_height: int = 1024) -> torch.Tensor:
    """The table as an RGB image ``(H, W, 3)`` uint8: one cell per atom, rows = layers, most
    important atoms on the left; masked-off atoms dimmed."""
    rows = table["layers"]
    columns = max((len(r["atoms"]) for r in rows), default=0) or 1
    values = torch.zeros(max(1, len(rows)), columns, dtype=torch.float64)
    kept = torch.ones(max(1, len(rows)), columns, dtype=torch.bool)
    for r, row in enumerate(rows):
        values[r, : len(row["importance"])] = torch.tensor(row["importance"], dtype=torch.float64)
        kept[r, : len(row["kept"])] = torch.tensor(row["kept"], dtype=torch.bool)
    rgb = colours(values, table["min"], table["max"])
    rgb = torch.where(kept[..., None], rgb, rgb * _OFF_DIM)
    cell_w = max(1, min(16, max_width // columns))
    cell_h = max(1, min(16, max_height // max(1, len(rows))))
    image = rgb.repeat_interleave(cell_h, 0).repeat_interleave(cell_w, 1)
    return image.round().clamp(0, 255).to(torch.uint8)
