"""Render the glyph data set, A-Z a-z 0-9 at 32 x 32, from Debian's font packages.

    apt-get install fonts-dejavu-core fonts-dejavu-extra fonts-liberation fonts-liberation2 \\
        fonts-urw-base35 fonts-crosextra-carlito fonts-crosextra-caladea fonts-linuxlibertine \\
        fonts-freefont-ttf fonts-ebgaramond fonts-roboto-unhinted fonts-open-sans fonts-lato \\
        fonts-cantarell fonts-inconsolata fonts-firacode fonts-hack fonts-jetbrains-mono \\
        fonts-sil-gentiumplus fonts-sil-charis fonts-sil-andika fonts-texgyre fonts-cmu \\
        fonts-lmodern fonts-comic-neue fonts-cabin fonts-noto-core fonts-noto-mono fonts-go \\
        fonts-croscore fonts-adf-accanthis fonts-adf-gillius fonts-adf-universalis \\
        fonts-adf-berenis fonts-adf-baskervald fonts-adf-verana fonts-font-awesome \
        fonts-dancingscript fonts-kaushanscript fonts-kristi fonts-lobster \
        fonts-levien-typoscript fonts-rufscript fonts-dkg-handwriting fonts-breip \
        fonts-femkeklaver fonts-humor-sans fonts-joscelyn fonts-ecolier-court \
        fonts-leckerli-one fonts-apropal fonts-okolaks fonts-national-park fonts-havana \
        fonts-klaudia-berenika fonts-bwht
    pip install fonttools
    python -m glyphs.render --out glyphs/data      # writes glyphs.npz (all) + eval_pack.npz

One rule for every font (so weight and proportions survive): the em is :data:`EM` pixels, the
baseline :data:`BASELINE` pixels from the top, each glyph centred horizontally on its advance;
rendered at 4x and area-averaged (anti-aliased ink in [0, 255], white on black). A font is
dropped when it is a symbol font (no Unicode cmap of the 62 characters) or any character is
missing, maps to ``.notdef``, draws nothing or draws the font's own ``.notdef`` box. Families and
styles come from the font's name table (IDs 16/17, else 1/2), weight from OS/2 ``usWeightClass``,
italic from OS/2 ``fsSelection`` / ``head.macStyle`` / the italic angle, the class from PANOSE
(``bFamilyType`` 3 script, 4 display; ``bProportion`` 9 or ``post.isFixedPitch`` mono;
``bSerifStyle`` 11-13 sans, 2-10 serif) and, where PANOSE is unset, from the family name (words
like Sans, Mono, Serif, Script), for the script and display packages from their Debian
description (:data:`PACKAGE_CLASSES`), else from the capital I's foot
(:func:`serif_from_shape`); ``class_source`` says which. One font per (family, style).

The split (fixed by :data:`SEED`): at least 10 % of the families of every class held out, in
whole typeface groups (a family name's first word within a class, so near-twins such as Latin
Modern's optical sizes never straddle it), and the characters :data:`HELD_OUT_CHARS` held out of
training entirely. ``eval_pack.npz`` holds every held-out family's renderings of all characters
(``images`` uint8 (F, C, 32, 32), ``families``, ``styles``, ``chars`` and the fonts' metadata);
``LICENSES.md`` beside it lists their packages and licences.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys

import numpy as np

CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
HELD_OUT_CHARS = "Rg4"  # never trained on: the "new character" experiments
SIZE, EM, BASELINE, OVERSAMPLE = 32, 22, 25, 4
SEED = 0
HELD_OUT_SHARE = 0.10
PACKAGES = __doc__.split("apt-get install")[1].split("pip install")[0].replace("\\", " ").split()
CLASSES = ("serif", "sans", "mono", "script", "display")
# Script and display packages whose fonts leave PANOSE unset: their class, as the package's own
# Debian description gives it ("lively casual script", "fat display typeface", ...)
PACKAGE_CLASSES = {
    **dict.fromkeys(("fonts-dancingscript", "fonts-kaushanscript", "fonts-kristi", "fonts-lobster",
                     "fonts-levien-typoscript", "fonts-rufscript", "fonts-dkg-handwriting",
                     "fonts-breip", "fonts-femkeklaver", "fonts-humor-sans", "fonts-joscelyn",
                     "fonts-ecolier-court", "fonts-havana", "fonts-bwht"), "script"),
    **dict.fromkeys(("fonts-leckerli-one", "fonts-apropal", "fonts-okolaks",
                     "fonts-national-park", "fonts-klaudia-berenika"), "display"),
}
FONT_SUFFIXES = (".ttf", ".otf", ".pfb", ".t1")


def package_fonts(packages=PACKAGES) -> list[tuple[str, str]]:
    """``(package, font file)`` for every outline font file the installed ``packages`` ship."""
    found = []
    for package in packages:
        listed = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True)
        if listed.returncode:
            print(f"not installed: {package}", file=sys.stderr)
            continue
        found += [(package, path) for path in sorted(listed.stdout.split())
                  if path.lower().endswith((".ttf", ".otf")) and os.path.isfile(path)]
    return found


def metadata(path: str) -> dict | None:
    """Family, style, weight, italic, class (and where the class came from), licence; ``None``
    for a font without a Unicode map of every character."""
    from fontTools.ttLib import TTFont

    try:
        font = TTFont(path, fontNumber=0, lazy=True)
        cmap = font.getBestCmap() or {}
    except Exception:  # a file fontTools cannot read is no font for us
        return None
    if any(ord(c) not in cmap or cmap[ord(c)] == ".notdef" for c in CHARS):
        return None
    os2 = font["OS/2"] if "OS/2" in font else None
    if os2 is not None and os2.panose.bFamilyType == 5:  # PANOSE "pictorial": a symbol font
        return None
    if _symbol_names([cmap[ord(c)] for c in CHARS]):
        return None
    names = font["name"]
    name = lambda *ids: next((str(names.getDebugName(i)) for i in ids if names.getDebugName(i)), "")
    family, style = name(16, 1), name(17, 2) or "Regular"
    italic = bool((os2 is not None and os2.fsSelection & 1) or font["head"].macStyle & 2
                  or ("post" in font and font["post"].italicAngle != 0))
    weight = int(os2.usWeightClass) if os2 is not None else 400
    fixed = "post" in font and bool(font["post"].isFixedPitch)
    panose = getattr(os2, "panose", None)
    kind, source = None, "panose"
    if panose is not None:
        if panose.bFamilyType == 3:
            kind = "script"
        elif panose.bFamilyType == 4:
            kind = "display"
        elif fixed or panose.bProportion == 9:
            kind = "mono"
        elif 11 <= panose.bSerifStyle <= 13:
            kind = "sans"
        elif 2 <= panose.bSerifStyle <= 10:
            kind = "serif"
    if kind is None and fixed:
        kind = "mono"
    if kind is None:
        kind, source = _class_from_name(family), "name"
    return {"family": family, "style": style, "weight": weight, "italic": italic, "class": kind,
            "class_source": source, "licence": name(13)[:300], "licence_url": name(14)}


DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _symbol_names(names: list[str]) -> bool:
    """Glyph names that say the letters are something else (Symbol maps A to "Alpha",
    Dingbats to "a10"); fonts with generic names (``glyph00012``) say nothing."""
    expected = [DIGIT_NAMES[int(c)] if c.isdigit() else c for c in CHARS]
    standard = [n == e or n.split(".")[0] == e or n == f"uni{ord(c):04X}"
                for n, e, c in zip(names, expected, CHARS)]
    generic = all(re.fullmatch(r"(glyph|gid|cid|g)?\d+", n) for n in names)
    return not generic and sum(standard) < len(CHARS) - 3


def _class_from_name(family: str) -> str:
    words = family.lower().replace("-", " ").split()
    if {"mono", "monospace", "code", "typewriter", "tt"} & set(words):
        return "mono"
    if {"script", "hand", "handwriting", "chancery", "calligraphic"} & set(words):
        return "script"
    if {"sans", "grotesk", "gothic"} & set(words) or "sans" in family.lower():
        return "sans"
    if {"serif", "roman", "garamond", "schoolbook", "bookman", "times"} & set(words):
        return "serif"
    return None  # the glyphs decide (:func:`serif_from_shape`)


def serif_from_shape(images: np.ndarray) -> str:
    """``"serif"`` or ``"sans"`` from the rendered capital I: serifs make its foot much wider
    than its stem (ink width in the lowest eighth of the glyph against the middle)."""
    glyph = images[CHARS.index("I")] > 96
    rows = np.flatnonzero(glyph.any(1))
    if len(rows) < 4:
        return "sans"
    width = lambda row: int(glyph[row].sum())
    foot = max(width(r) for r in rows[-max(1, len(rows) // 8):])
    stem = width(rows[len(rows) // 2])
    return "serif" if stem and foot >= 1.8 * stem else "sans"


def render(path: str) -> np.ndarray | None:
    """``(len(CHARS), SIZE, SIZE)`` uint8, or ``None`` if a character draws nothing or draws
    the font's ``.notdef`` box."""
    from PIL import Image, ImageDraw, ImageFont

    big = SIZE * OVERSAMPLE
    try:
        font = ImageFont.truetype(path, EM * OVERSAMPLE)
    except OSError:
        return None

    def draw(text: str) -> np.ndarray:
        canvas = Image.new("L", (big, big), 0)
        advance = font.getlength(text)
        ImageDraw.Draw(canvas).text(((big - advance) / 2, BASELINE * OVERSAMPLE), text, fill=255,
                                    font=font, anchor="ls")
        pixels = np.asarray(canvas, dtype=np.float32)
        return pixels.reshape(SIZE, OVERSAMPLE, SIZE, OVERSAMPLE).mean((1, 3))

    notdef = draw("\U0010FFFD")  # a private code point no Latin font maps: its .notdef box
    images = []
    for char in CHARS:
        image = draw(char)
        if image.max() < 64 or (notdef.max() > 0 and np.abs(image - notdef).max() < 1):
            return None
        images.append(image)
    return np.round(np.stack(images)).clip(0, 255).astype(np.uint8)


def typeface_group(family: str, kind: str) -> tuple[str, str]:
    """The unit of the split: the family name's first word and the class (so Latin Modern's
    optical sizes and caps, or Noto Sans and Noto Sans Display, stay on one side, while Noto
    Sans and Noto Serif, different designs, may part)."""
    return family.split()[0].lower(), kind


def split(fonts: list[dict], seed: int = SEED) -> set[str]:
    """The held-out families: per class, whole typeface groups (:func:`typeface_group`) drawn
    with ``seed`` until at least :data:`HELD_OUT_SHARE` of the class's families are held out
    (none from a class with a single group)."""
    generator = np.random.default_rng(seed)
    held = set()
    for kind in CLASSES:
        families = sorted({f["family"] for f in fonts if f["class"] == kind})
        groups = sorted({typeface_group(f, kind) for f in families})
        if len(groups) < 2:
            continue
        wanted = int(np.ceil(HELD_OUT_SHARE * len(families)))
        chosen = []
        for index in generator.permutation(len(groups)):
            chosen += [f for f in families if typeface_group(f, kind) == groups[index]]
            if len(chosen) >= wanted:
                break
        held |= set(chosen)
    return held


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "data"))
    options = parser.parse_args(argv)
    logging.getLogger("fontTools").setLevel(logging.ERROR)
    fonts, images, seen, dropped = [], [], set(), {}
    for package, path in package_fonts():
        meta = metadata(path)
        if meta is None:
            dropped[path] = "symbol font or characters missing"
            continue
        if (meta["family"], meta["style"]) in seen:
            dropped[path] = "a font of that family and style is in already"
            continue
        rendered = render(path)
        if rendered is None:
            dropped[path] = "a character draws nothing or the .notdef box"
            continue
        seen.add((meta["family"], meta["style"]))
        if package in PACKAGE_CLASSES and meta["class_source"] != "panose":
            meta.update({"class": PACKAGE_CLASSES[package], "class_source": "package"})
        if meta["class"] is None:
            meta.update({"class": serif_from_shape(rendered), "class_source": "glyph shape"})
        fonts.append({**meta, "package": package, "font_file": os.path.basename(path)})
        images.append(rendered)
    held = split(fonts)
    os.makedirs(options.out, exist_ok=True)
    table = {key: np.array([f[key] for f in fonts]) for key in
             ("family", "style", "weight", "italic", "class", "class_source", "package", "font_file")}
    held_mask = np.array([f["family"] in held for f in fonts])
    np.savez_compressed(os.path.join(options.out, "glyphs.npz"), images=np.stack(images),
                        chars=np.array(list(CHARS)), held_out_chars=np.array(list(HELD_OUT_CHARS)),
                        held_out_family=held_mask, **table)
    pack = os.path.join(options.out, "eval_pack.npz")
    np.savez_compressed(pack, images=np.stack(images)[held_mask], chars=np.array(list(CHARS)),
                        held_out_chars=np.array(list(HELD_OUT_CHARS)),
                        families=table["family"][held_mask], styles=table["style"][held_mask],
                        **{k: v[held_mask] for k, v in table.items() if k not in ("family", "style")})
    with open(os.path.join(options.out, "LICENSES.md"), "w", encoding="utf-8") as out:
        out.write("# Fonts whose renderings are in eval_pack.npz\n\n| family | style | package | "
                  "licence |\n|---|---|---|---|\n")
        for f in fonts:
            if f["family"] in held:
                licence = " ".join((f["licence"] or f["licence_url"] or "see the package").split())
                out.write(f"| {f['family']} | {f['style']} | {f['package']} | {licence[:160]} |\n")
    summary = {"fonts": len(fonts), "families": len({f['family'] for f in fonts}),
               "held_out_families": sorted(held), "dropped": len(dropped),
               "classes": {k: sum(f["class"] == k for f in fonts) for k in CLASSES},
               "eval_pack_bytes": os.path.getsize(pack)}
    with open(os.path.join(options.out, "render_report.json"), "w") as out:
        json.dump({**summary, "dropped_files": dropped}, out, indent=1)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
