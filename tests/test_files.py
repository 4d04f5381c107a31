"""Sparse Atoms files: round trips, atomic writes, and every kind of bad file."""

import json
import os
import struct

import pytest
import torch
from safetensors.torch import save as save_safetensors

import sparse_core as sc
from sparse_core._files import split_tensor_name


def sample_atoms():
    generator = torch.Generator().manual_seed(0)
    weights = {"diffusion_model.blocks.0.attn.to_k": torch.randn(16, 12, generator=generator),
               "diffusion_model.blocks.0.conv": torch.randn(8, 4, 3, 3, generator=generator)}
    atoms = sc.build_atoms(weights, 4, "svd", info=sc.AtomsInfo(architecture="test-dit"))
    for layer in atoms.layers.values():
        layer.coefficients.copy_(torch.randn(4, generator=generator))
    atoms.info.prompt = "a photo of sks"
    atoms.info.training = {"steps": 10, "lr": 0.001}
    return atoms.select({"diffusion_model.blocks.0.conv": torch.tensor([True, False, True, True])})


def assert_identical(a, b):
    assert a.keys() == b.keys()
    for key in a:
        for field in ("atoms", "readouts", "coefficients", "index"):
            x, y = getattr(a[key], field), getattr(b[key], field)
            assert x.dtype == y.dtype and torch.equal(x, y), (key, field)
        assert a[key].weight_shape == b[key].weight_shape
    assert a.info == b.info


def test_save_load_is_bit_exact(tmp_path):
    atoms = sample_atoms()
    path = tmp_path / "concept.safetensors"
    sc.save_atoms(atoms, path)
    assert_identical(atoms, sc.load_atoms(path))
    assert [p.name for p in tmp_path.iterdir()] == ["concept.safetensors"]  # no temp file left


def test_half_precision_and_empty_layers_round_trip(tmp_path):
    atoms = sample_atoms().to(dtype=torch.float16)
    atoms = atoms.select({"diffusion_model.blocks.0.attn.to_k": torch.zeros(4, dtype=torch.bool)})
    back = sc.atoms_from_bytes(sc.atoms_to_bytes(atoms))
    assert_identical(atoms, back)
    assert back["diffusion_model.blocks.0.attn.to_k"].n_atoms == 0


def test_failed_write_leaves_the_old_file_untouched(tmp_path):
    path = tmp_path / "concept.safetensors"
    sc.save_atoms(sample_atoms(), path)
    before = path.read_bytes()
    with pytest.raises(TypeError):
        sc.save_atoms({"not": "atoms"}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["concept.safetensors"]


def header_and_tensors(data):
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length]), length


def rewrite(atoms, *, metadata=None, tensors=None):
    """Re-save the atoms' tensors with changed metadata or tensors (a forged file)."""
    data = sc.atoms_to_bytes(atoms)
    header, _ = header_and_tensors(data)
    meta = dict(header["__metadata__"], **(metadata or {}))
    meta = {k: v for k, v in meta.items() if v is not None}
    from safetensors.torch import load
    state = load(data)
    for name, value in (tensors or {}).items():
        if value is None:
            state.pop(name)
        else:
            state[name] = value
    return save_safetensors(state, metadata=meta)


KEY = "diffusion_model.blocks.0.attn.to_k"
BAD_FILES = [
    ("empty", lambda a: b"", "too short"),
    ("random bytes", lambda a: os.urandom(64), "truncated or not safetensors|not valid JSON"),
    ("truncated", lambda a: sc.atoms_to_bytes(a)[:-10], "truncated or padded"),
    ("padded", lambda a: sc.atoms_to_bytes(a) + b"\0" * 4, "truncated or padded"),
    ("a LoRA", lambda a: save_safetensors(sc.to_lora(a)), "not a Sparse Atoms file"),
    ("other format", lambda a: rewrite(a, metadata={"format": "kohya"}), "format='kohya'"),
    ("future version", lambda a: rewrite(a, metadata={"format_version": "9"}), "unsupported format_version"),
    ("layers not JSON", lambda a: rewrite(a, metadata={"layers": "[["}), "'layers' is not JSON"),
    ("no layers", lambda a: rewrite(a, metadata={"layers": None}), "'layers' is missing"),
    ("training not JSON", lambda a: rewrite(a, metadata={"training": "{"}), "'training' is not JSON"),
    ("missing tensor", lambda a: rewrite(a, tensors={f"{KEY}:index": None}), "is missing"),
    ("extra tensor", lambda a: rewrite(a, tensors={"x:atoms": torch.zeros(1)}), "unexpected tensor"),
    ("wrong shape", lambda a: rewrite(a, tensors={f"{KEY}:atoms": torch.zeros(4, 15)}), "must have shape"),
    ("int atoms", lambda a: rewrite(a, tensors={f"{KEY}:atoms": torch.zeros(4, 16, dtype=torch.int32)}),
     "expected a float dtype"),
    ("float index", lambda a: rewrite(a, tensors={f"{KEY}:index": torch.zeros(4)}), "expected I64"),
    ("NaN", lambda a: rewrite(a, tensors={f"{KEY}:coefficients": torch.full((4,), float("nan"))}),
     "coefficients contains NaN"),
    ("duplicate ids", lambda a: rewrite(a, tensors={f"{KEY}:index": torch.zeros(4, dtype=torch.long)}),
     "distinct non-negative"),
    ("forged fingerprint", lambda a: rewrite(a, metadata={"fingerprint": "0" * 64}), "fingerprint"),
    ("shape lie", lambda a: rewrite(a, metadata={"layers": json.dumps([[KEY, [16, 13]], [
        "diffusion_model.blocks.0.conv", [8, 4, 3, 3]]])}), "must have shape"),
]


@pytest.mark.parametrize("name, make, match", BAD_FILES, ids=[case[0] for case in BAD_FILES])
def test_bad_files_raise_a_clear_error_naming_the_file(tmp_path, name, make, match):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(make(sample_atoms()))
    with pytest.raises(sc.AtomsFileError, match=match) as raised:
        sc.load_atoms(path)
    assert str(path) in str(raised.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(sc.AtomsFileError, match="cannot be read"):
        sc.load_atoms(tmp_path / "nope.safetensors")


def test_tensor_names_come_from_one_helper():
    name = sc.tensor_name("a.b.c", "atoms")
    assert split_tensor_name(name) == ("a.b.c", "atoms")
