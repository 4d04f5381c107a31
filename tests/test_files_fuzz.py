"""Fuzz the loader: thousands of mutated files each either load as valid atoms or raise the
project's own AtomsFileError; never another exception, a crash, a hang or a half-built object."""

import dataclasses
import json
import os
import struct
import tempfile

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparse_core as sc

_generator = torch.Generator().manual_seed(0)
_ATOMS = sc.build_atoms({"model.a.to_q": torch.randn(6, 5, generator=_generator),
                         "model.b.conv": torch.randn(4, 2, 3, 3, generator=_generator)}, 3, "svd",
                        info=sc.AtomsInfo(architecture="fuzz", prompt="p"))
for _layer in _ATOMS.layers.values():
    _layer.coefficients.copy_(torch.randn(3, generator=_generator))
# one layer with measured effects (the optional fifth tensor), one without
_ATOMS.layers["model.a.to_q"] = dataclasses.replace(_ATOMS["model.a.to_q"], effect=torch.rand(3, generator=_generator))
_ATOMS.info.effects = {"method": "jacobian"}
VALID = sc.atoms_to_bytes(_ATOMS)
(HEADER_LENGTH,) = struct.unpack("<Q", VALID[:8])

FUZZ = settings(max_examples=1000, deadline=2000, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])


def loads_or_refuses(data: bytes) -> None:
    try:
        atoms = sc.atoms_from_bytes(data, source="fuzzed")
    except sc.AtomsFileError as error:
        assert str(error).startswith("fuzzed: ")
        return
    # What loads is whole and valid: it survives its own round trip unchanged.
    again = sc.atoms_from_bytes(sc.atoms_to_bytes(atoms))
    assert again.keys() == atoms.keys() == _ATOMS.keys()
    for key in atoms:
        assert torch.equal(again[key].atoms, atoms[key].atoms)
        assert bool(torch.isfinite(atoms[key].coefficients).all())
        effect = atoms[key].effect
        assert effect is None or bool((torch.isfinite(effect) & (effect >= 0)).all())


@FUZZ
@given(st.integers(min_value=0, max_value=len(VALID) - 1))
def test_truncated_files(length):
    loads_or_refuses(VALID[:length])


def with_bits_flipped(data: bytes, flips) -> bytes:
    """``data`` with bit ``bit`` of byte ``position`` inverted for each ``(position, bit)``."""
    flipped = bytearray(data)
    for position, bit in flips:
        flipped[position] ^= 1 << bit
    return bytes(flipped)


@settings(FUZZ, max_examples=150)
@given(st.integers(min_value=0, max_value=len(VALID) - 1), st.binary(max_size=16))
def test_damaged_files_on_disk(length, tail):
    """The file reader (header first, then the body) holds the same line as the bytes parser."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "fuzzed.safetensors")
        with open(path, "wb") as stream:
            stream.write(VALID[:length] + tail)
        try:
            atoms = sc.load_atoms(path)
        except sc.AtomsFileError as error:
            assert str(error).startswith(f"{path}: ")
            return
        assert atoms.keys() == _ATOMS.keys()


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 7)), min_size=1, max_size=6))
def test_bit_flips_anywhere(flips):
    loads_or_refuses(with_bits_flipped(VALID, flips))


@FUZZ
@given(st.lists(st.tuples(st.integers(8, 8 + HEADER_LENGTH - 1), st.integers(0, 7)), min_size=1,
                max_size=4))
def test_bit_flips_in_the_header(flips):
    loads_or_refuses(with_bits_flipped(VALID, flips))


@FUZZ
@given(st.binary(max_size=64), st.integers(0, len(VALID)))
def test_inserted_bytes(chunk, position):
    loads_or_refuses(VALID[:position] + chunk + VALID[position:])


def _json_values():
    return st.recursive(
        st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                    max_size=4),
        max_leaves=12,
    )


def _with_header(header: dict) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + VALID[8 + HEADER_LENGTH:]


@FUZZ
@given(st.sampled_from(sorted(json.loads(VALID[8:8 + HEADER_LENGTH]))), st.sampled_from(
    ["dtype", "shape", "data_offsets", None]), _json_values())
def test_forged_header_entries(name, field, value):
    header = json.loads(VALID[8:8 + HEADER_LENGTH])
    if name == "__metadata__":
        header[name] = value if field is None else dict(header[name], **{field: value})
    elif field is None:
        header[name] = value
    else:
        header[name] = dict(header[name], **{field: value})
    loads_or_refuses(_with_header(header))


@FUZZ
@given(st.sampled_from(["format", "format_version", "layers", "fingerprint", "training",
                        "architecture", "effects"]), st.one_of(st.text(max_size=40), _json_values().map(json.dumps)))
def test_forged_metadata(field, value):
    header = json.loads(VALID[8:8 + HEADER_LENGTH])
    header["__metadata__"][field] = value
    loads_or_refuses(_with_header(header))
