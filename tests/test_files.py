"""Sparse Atoms files: round trips (with and without effects, version 1), atomic writes, and
every kind of bad file."""

import dataclasses
import json
import os
import struct

import pytest
import torch
from safetensors.torch import save as save_safetensors

import sparse_core as sc
from sparse_core._atomic_write import host_tag, temp_name
from sparse_core._files import split_tensor_name

from repo_support import REPO


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


def with_effects(atoms):
    """The atoms with a measured effect per atom (every layer) and how it was measured."""
    generator = torch.Generator().manual_seed(5)
    layers = {key: dataclasses.replace(layer, effect=torch.rand(layer.n_atoms, generator=generator))
              for key, layer in atoms.layers.items()}
    info = dataclasses.replace(atoms.info, effects={"method": "jacobian", "batches": 2})
    return sc.SparseAtoms(layers, info)


def assert_identical(a, b):
    assert a.keys() == b.keys()
    for key in a:
        for field in ("atoms", "readouts", "coefficients", "index"):
            x, y = getattr(a[key], field), getattr(b[key], field)
            assert x.dtype == y.dtype and torch.equal(x, y), (key, field)
        assert a[key].weight_shape == b[key].weight_shape
        x, y = a[key].effect, b[key].effect
        assert (x is None and y is None) or (y.dtype == torch.float32 and torch.equal(x.float(), y))
    assert a.info == b.info


def test_save_load_is_bit_exact(tmp_path):
    atoms = sample_atoms()
    path = tmp_path / "concept.safetensors"
    sc.save_atoms(atoms, path)
    back = sc.load_atoms(path)
    assert_identical(atoms, back)
    assert back.importance_kind == "weight norm"
    assert not any(name.endswith(":effect") for name in header_and_tensors(path.read_bytes())[0])
    assert [p.name for p in tmp_path.iterdir()] == ["concept.safetensors"]  # no temp file left


def test_effects_round_trip_as_a_fifth_tensor_and_metadata(tmp_path):
    atoms = with_effects(sample_atoms())
    path = tmp_path / "concept.safetensors"
    sc.save_atoms(atoms, path)
    header, _ = header_and_tensors(path.read_bytes())
    assert header[f"{KEY}:effect"]["dtype"] == "F32"
    assert json.loads(header["__metadata__"]["effects"]) == {"method": "jacobian", "batches": 2}
    assert header["__metadata__"]["format_version"] == "2"
    back = sc.load_atoms(path)
    assert_identical(atoms, back)
    assert back.importance_kind == "effect"
    assert torch.equal(back[KEY].importance(), atoms[KEY].effect)


def version_1_bytes(atoms):
    """A file as version 1 wrote it: four tensors per layer, no effects."""
    tensors = {sc.tensor_name(key, field): getattr(layer, field).contiguous()
               for key, layer in atoms.layers.items()
               for field in ("atoms", "readouts", "coefficients", "index")}
    info = atoms.info
    metadata = {"format": "sparse_atoms", "format_version": "1", "fingerprint": atoms.fingerprint(),
                "layers": json.dumps([[k, list(layer.weight_shape)] for k, layer in atoms.layers.items()]),
                "architecture": info.architecture, "dictionary_method": info.dictionary_method,
                "prompt": info.prompt, "training": json.dumps(info.training, sort_keys=True)}
    return save_safetensors(tensors, metadata=metadata)


def test_version_1_files_still_load_and_rank_by_weight_norm(tmp_path):
    atoms = sample_atoms()
    path = tmp_path / "old.safetensors"
    path.write_bytes(version_1_bytes(atoms))
    back = sc.load_atoms(path)
    assert_identical(atoms, back)
    assert back.importance_kind == "weight norm" and back.info.effects == {}
    # version 1 had no effect tensors: one in a version-1 file is foreign
    forged = rewrite(with_effects(atoms), metadata={"format_version": "1"})
    with pytest.raises(sc.AtomsFileError, match="unexpected tensor .*:effect"):
        sc.atoms_from_bytes(forged)


def test_effects_stored_on_pruned_atoms_never_rank_them_first(tmp_path):
    """A file whose zero-coefficient atoms carry the largest stored effects (measured before
    pruning): top-k, density and the table rank the live atoms first."""
    atoms = with_effects(sample_atoms())
    for layer in atoms.layers.values():
        dead = torch.arange(layer.n_atoms) % 2 == 0
        layer.coefficients[dead] = 0.0
        layer.effect = torch.where(dead, 100.0, layer.effect)
    sc.save_atoms(atoms, tmp_path / "pruned.safetensors")
    loaded = sc.load_atoms(tmp_path / "pruned.safetensors")
    live = loaded.n_active
    for kept in (loaded.top_k(3), loaded.density(3 / loaded.n_atoms), loaded.top_k(live)):
        assert kept.n_active == kept.n_atoms  # only live atoms kept
    assert loaded.top_k(live).n_active == live
    table = sc.importance_table(loaded)
    for row, layer in zip(table["layers"], loaded.layers.values()):
        live_ids = set(layer.index[layer.coefficients != 0].tolist())
        assert set(row["atoms"][:len(live_ids)]) == live_ids
        assert all(e == 0.0 for e in row["effect"][len(live_ids):])


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
        sc.save_atoms({"not": "atoms"}, path, overwrite=True)
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
    ("negative effect", lambda a: rewrite(with_effects(a), tensors={f"{KEY}:effect": -torch.ones(4)}),
     "effect must be finite and >= 0"),
    ("NaN effect", lambda a: rewrite(with_effects(a), tensors={f"{KEY}:effect": torch.full((4,), float("nan"))}),
     "effect must be finite and >= 0"),
    ("effect beyond float32", lambda a: rewrite(with_effects(a), tensors={
        f"{KEY}:effect": torch.full((4,), 1e300, dtype=torch.float64)}), "effect does not fit float32"),
    ("effect of part of a layer", lambda a: rewrite(with_effects(a), tensors={f"{KEY}:effect": torch.ones(3)}),
     r"effect must have shape \(4,\)"),
    ("int effect", lambda a: rewrite(with_effects(a), tensors={f"{KEY}:effect": torch.ones(4, dtype=torch.int32)}),
     "expected a float dtype"),
    ("effects not JSON", lambda a: rewrite(with_effects(a), metadata={"effects": "{"}), "'effects' is not JSON"),
    ("effects not an object", lambda a: rewrite(a, metadata={"effects": "[1]"}), "'effects' must be a JSON object"),
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


# -- what is refused on saving ----------------------------------------------------------------

def test_saving_refuses_nan_and_inf_by_layer_and_field():
    for field, bad in (("coefficients", float("nan")), ("atoms", float("inf"))):
        atoms = sample_atoms()
        getattr(atoms[KEY], field).view(-1)[1] = bad
        with pytest.raises(ValueError, match=f"layer '{KEY}': {field} contains NaN or inf"):
            sc.atoms_to_bytes(atoms)
    atoms = with_effects(sample_atoms())
    atoms[KEY].effect[0] = -1.0
    with pytest.raises(ValueError, match=f"layer '{KEY}': effect must be finite and >= 0"):
        sc.atoms_to_bytes(atoms)


def test_lone_surrogates_in_metadata_save_to_a_readable_file(tmp_path):
    atoms = sample_atoms()
    atoms.info.prompt = "a photo of \ud800sks"  # what a JSON "\ud800" escape gives Python
    atoms.info.training = {"note": "x\udfff"}
    path = tmp_path / "concept.safetensors"
    sc.save_atoms(atoms, path)
    back = sc.load_atoms(path)
    assert back.info.prompt == "a photo of \ufffdsks"
    assert back.info.training == {"note": "x\udfff"}  # JSON escapes it: kept as it was


def test_unsaveable_keys_and_metadata_are_clear_errors():
    atoms = sample_atoms()
    bad_key = sc.SparseAtoms({"model.\udc80x": atoms[KEY]})
    with pytest.raises(ValueError, match="not valid Unicode"):
        sc.atoms_to_bytes(bad_key)
    atoms.info.training = {"lr": object()}
    with pytest.raises(TypeError, match="info.training must hold JSON values"):
        sc.atoms_to_bytes(atoms)
    atoms.info.training = [1, 2]
    with pytest.raises(TypeError, match="info.training must be a dict"):
        sc.atoms_to_bytes(atoms)


# -- writing: no silent overwrite, short temporary names, leftovers cleaned --------------------

def test_save_never_overwrites_unless_asked(tmp_path):
    path = tmp_path / "mine.safetensors"
    path.write_bytes(b"a user's own file")
    with pytest.raises(FileExistsError, match="overwrite=True") as raised:
        sc.save_atoms(sample_atoms(), path)
    assert str(path) in str(raised.value)
    assert path.read_bytes() == b"a user's own file"
    sc.save_atoms(sample_atoms(), path, overwrite=True)
    assert_identical(sample_atoms(), sc.load_atoms(path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.safetensors"]


def test_a_file_that_appears_during_the_write_is_not_replaced(tmp_path, monkeypatch):
    path = tmp_path / "race.safetensors"
    real_fsync = os.fsync

    def another_writer_wins(descriptor):  # the target appears after the existence check
        path.write_bytes(b"the other writer's file")
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", another_writer_wins)
    with pytest.raises(FileExistsError):
        sc.write_atomic(path, b"ours")
    assert path.read_bytes() == b"the other writer's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["race.safetensors"]


def test_without_hard_links_the_name_is_still_claimed_exclusively(tmp_path, monkeypatch):
    def no_links(source, target):
        raise OSError(1, "Operation not permitted")  # what vfat answers

    monkeypatch.setattr(os, "link", no_links)
    path = tmp_path / "fat.safetensors"
    sc.write_atomic(path, b"data")
    assert path.read_bytes() == b"data"
    with pytest.raises(FileExistsError):
        sc.write_atomic(path, b"other")
    assert path.read_bytes() == b"data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fat.safetensors"]


def test_a_230_character_name_saves(tmp_path):
    path = tmp_path / ("n" * (230 - len(".safetensors")) + ".safetensors")
    assert len(path.name) == 230
    sc.save_atoms(sample_atoms(), path)
    assert_identical(sample_atoms(), sc.load_atoms(path))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def dead_pid():
    """The pid of a process that has ended."""
    import subprocess
    import sys
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.mark.skipif(not hasattr(os, "fork"), reason="kill -9 of a forked writer needs POSIX")
def test_kill_9_during_a_save_leaves_a_temp_file_that_cleaning_removes(tmp_path):
    import signal
    target = tmp_path / "killed.safetensors"
    child = os.fork()
    if child == 0:  # the writer: killed between writing its temporary file and naming it
        os.link = lambda *args: os.kill(os.getpid(), signal.SIGKILL)
        sc.write_atomic(target, b"x" * 4096)
        os._exit(0)
    _, status = os.waitpid(child, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    leftovers = [p for p in tmp_path.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(f".sparse-atoms-{host_tag()}-{child}-")
    assert not target.exists()
    assert sc.clean_temp_files(tmp_path) == [str(leftovers[0])]
    assert list(tmp_path.iterdir()) == []


def test_cleaning_removes_only_temp_files_of_writers_that_are_gone(tmp_path):
    def temp(pid, age_s=0.0, host=None, name=None):
        path = tmp_path / (name or temp_name(pid, host))
        path.write_bytes(b"partial")
        if age_s:
            os.utime(path, (path.stat().st_mtime - age_s,) * 2)
        return path

    ours, day = host_tag(), 24 * 3600
    other_host = format(int(ours[:8], 16) ^ 1, "08x") + ours[8:]
    other_namespace = ours[:8] + format(int(ours[8:], 16) ^ 1, "08x")
    dead = temp(dead_pid())
    ours_not_writing = temp(os.getpid())  # a previous process with our pid (a restarted container)
    old_but_alive = temp(os.getppid(), age_s=2 * day)
    alive = temp(os.getppid())
    # another host or container sharing the folder: its pids mean nothing here
    other_host_fresh = temp(dead_pid(), host=other_host)
    other_host_old = temp(dead_pid(), host=other_host, age_s=30 * day)
    other_namespace_fresh = temp(dead_pid(), host=other_namespace)
    other_namespace_old = temp(dead_pid(), host=other_namespace, age_s=2 * day)
    # the names of older versions (no host part): only age tells
    unversioned_fresh = temp(0, name=f".sparse-atoms-{dead_pid()}-{os.urandom(8).hex()}.tmp")
    unversioned_old = temp(0, age_s=2 * day, name=f".sparse-atoms-{dead_pid()}-{os.urandom(8).hex()}.tmp")
    others = [tmp_path / "concept.safetensors", tmp_path / ".concept.safetensors.tmp",
              tmp_path / ".sparse-atoms-12-nothex.tmp", tmp_path / "x.sparse-atoms-1-0123456789abcdef.tmp"]
    for path in others:
        path.write_bytes(b"not ours")
    folder_named_like_one = tmp_path / temp_name(dead_pid())
    folder_named_like_one.mkdir()
    removed = sc.clean_temp_files(tmp_path)
    assert sorted(removed) == sorted(str(p) for p in (dead, ours_not_writing, old_but_alive,
                                                      other_namespace_old, unversioned_old))
    for kept in (alive, other_host_fresh, other_host_old, other_namespace_fresh, unversioned_fresh):
        assert kept.read_bytes() == b"partial"
    assert folder_named_like_one.is_dir()
    assert all(path.read_bytes() == b"not ours" for path in others)
    assert sc.clean_temp_files(tmp_path / "missing") == []


_FOREIGN_WRITER = """
import sys, sparse_core._atomic_write as aw
aw.host_tag = lambda: sys.argv[2]  # a writer in another container sharing the folder
for i in range(int(sys.argv[3])):
    aw.write_atomic(f"{sys.argv[1]}/foreign_{i:03d}.bin", b"x" * 200_000)
"""


def test_a_writer_on_another_host_never_loses_a_save_to_our_cleaning(tmp_path):
    """Its temporary files carry a pid of its own process table, which may be dead here: the
    cleaner must leave them alone while it writes (two writers, one folder, saves interleaved)."""
    import subprocess
    import sys
    foreign = format(int(host_tag()[:8], 16) ^ 0xFFFF, "08x") + "00000000"
    writer = subprocess.Popen([sys.executable, "-c", _FOREIGN_WRITER, str(tmp_path), foreign, "150"],
                              cwd=REPO, stderr=subprocess.PIPE, text=True)
    ours = 0
    while writer.poll() is None:
        sc.clean_temp_files(tmp_path)
        sc.write_atomic(tmp_path / f"ours_{ours:04d}.bin", b"y" * 1000)
        ours += 1
    assert writer.returncode == 0, writer.stderr.read()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([f"foreign_{i:03d}.bin" for i in range(150)] +
                           [f"ours_{i:04d}.bin" for i in range(ours)])


def test_writing_onto_a_folder_or_under_a_file_names_the_problem(tmp_path):
    (tmp_path / "isdir.safetensors").mkdir()
    for overwrite in (False, True):
        with pytest.raises(IsADirectoryError, match="a folder has this name") as caught:
            sc.write_atomic(tmp_path / "isdir.safetensors", b"data", overwrite=overwrite)
        assert caught.value.filename == str(tmp_path / "isdir.safetensors")
        assert ".tmp" not in str(caught.value)
    (tmp_path / "plain").write_bytes(b"a file")
    with pytest.raises(NotADirectoryError, match=r"plain is a file, not a folder"):
        sc.write_atomic(tmp_path / "plain" / "sub" / "x.safetensors", b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["isdir.safetensors", "plain"]
    assert (tmp_path / "plain").read_bytes() == b"a file"


# -- reading: regular files only, header before body, no bytes echoed --------------------------

@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX")
def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(sc.AtomsFileError, match="not a regular file \\(a FIFO\\)"):
        sc.load_atoms(fifo)


@pytest.mark.parametrize("path, kind", [("/dev/zero", "a character device"), (".", "a directory")])
def test_devices_and_folders_are_refused(path, kind):
    if not os.path.exists(path):
        pytest.skip(f"{path} does not exist here")
    with pytest.raises(sc.AtomsFileError, match=f"not a regular file \\({kind}\\)"):
        sc.load_atoms(path)


def test_errors_never_quote_the_file_bytes(tmp_path):
    secret = b"hunter2!" + b"password: hunter2\n" * 4
    target = tmp_path / "secret.txt"
    target.write_bytes(secret)
    link = tmp_path / "innocent.safetensors"
    link.symlink_to(target)
    with pytest.raises(sc.AtomsFileError) as raised:
        sc.load_atoms(link)
    message = str(raised.value)
    assert "hunter2" not in message
    assert str(struct.unpack("<Q", secret[:8])[0]) not in message  # the first 8 bytes as a number


def sparse_file(path, head: bytes, size: int):
    with open(path, "wb") as stream:
        stream.write(head)
        stream.truncate(size)  # a hole: no disk space, reads as zeros


@pytest.mark.parametrize("what", ["junk", "someone else's safetensors"])
def test_the_header_is_judged_before_the_body_is_read(tmp_path, what):
    import tracemalloc
    size = 64 * 2**20
    if what == "junk":
        raw = b"{not json at all"
    else:
        raw = json.dumps({"__metadata__": {"format": "kohya"}, "w": {
            "dtype": "F32", "shape": [(size - 1024) // 4], "data_offsets": [0, size - 1024]}}).encode()
        raw += b" " * (1024 - 8 - len(raw))
    path = tmp_path / "big.safetensors"
    sparse_file(path, struct.pack("<Q", len(raw)) + raw, size)
    tracemalloc.start()
    try:
        with pytest.raises(sc.AtomsFileError, match="not valid JSON|not a Sparse Atoms file"):
            sc.load_atoms(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20, f"{peak} bytes allocated to refuse a {size}-byte file"
