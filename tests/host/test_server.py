"""A headless ComfyUI server with the extension: node registry, and graphs through POST /prompt."""

import json
import math
import os
import pathlib

import pytest

from host_support import saved_digits


API = pathlib.Path(__file__).parent / "workflows_api"
NODES = {
    "SparseAtoms_BuildDictionary": ("Build Atom Dictionary", ["ATOM_DICT"]),
    "SparseAtoms_TrainConcept": ("Train Sparse Concept", ["MODEL", "SPARSE_ATOMS", "IMAGE", "IMAGE"]),
    "SparseAtoms_TrainingSamples": ("Sparse Training Samples", ["SPARSE_TRAINING_SAMPLES"]),
    "SparseAtoms_Apply": ("Apply Sparse Atoms", ["MODEL"]),
    "SparseAtoms_MaskEditor": ("Atom Mask Editor", ["SPARSE_ATOMS", "IMAGE"]),
    "SparseAtoms_Save": ("Save Sparse Atoms", []),
    "SparseAtoms_Load": ("Load Sparse Atoms", ["SPARSE_ATOMS"]),
    "SparseAtoms_ToLoRA": ("Sparse Atoms to LoRA", []),
    "SparseAtoms_FromLoRA": ("LoRA to Sparse Atoms", ["SPARSE_ATOMS"]),
    "SparseAtoms_LoadDigitsModel": ("Load Digits Model", ["MODEL"]),
    "SparseAtoms_DigitPrompt": ("Digit Prompt", ["CONDITIONING"]),
    "SparseAtoms_EmptyDigitsLatent": ("Empty Digits Latent", ["LATENT"]),
    "SparseAtoms_DigitsToImage": ("Digits to Image", ["IMAGE"]),
    "SparseAtoms_ImageToDigitsLatent": ("Image to Digits Latent", ["LATENT"]),
    "SparseAtoms_DigitExamples": ("Digit Examples", ["LATENT", "CONDITIONING"]),
    "SparseAtoms_MeasureEffects": ("Measure Atom Effects", ["SPARSE_ATOMS", "IMAGE"]),
}


def test_object_info_lists_every_node_with_its_types(server):
    info = server.get("/object_info")
    for node_id, (display, outputs) in NODES.items():
        assert node_id in info, f"{node_id} missing from /object_info"
        entry = info[node_id]
        assert entry["display_name"] == display
        assert entry["output"] == outputs
        assert entry["category"].startswith("sparse_atoms")
        for name, spec in {**entry["input"]["required"], **entry["input"].get("optional", {})}.items():
            options = spec[1] if len(spec) > 1 else {}
            assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"
            if spec[0] in ("INT", "FLOAT"):
                assert "min" in options and "max" in options, (node_id, name)
    assert info["SparseAtoms_TrainConcept"]["input"]["optional"]["atom_dict"][0].split(",") == [
        "ATOM_DICT", "SPARSE_ATOMS"]  # a dictionary, or trained atoms to train further
    assert info["SparseAtoms_Apply"]["input"]["required"]["sparse_atoms"][0] == "SPARSE_ATOMS"


@pytest.fixture(scope="module")
def evaluator():
    from digits.evaluator import DigitEvaluator

    return DigitEvaluator.fit()


# What each shipped digits graph must draw: {SaveImage node: (digit, bold or not, least share)},
# judged by the digits evaluator (classifiers fit on real digits only) on every image it saves.
DRAWS = {
    "digits_concept": {"11": (3, None, 0.8)},  # "sks", taught from eight 3s
    "digits_editing": {"12": (1, None, 0.8)},  # "1" after a 7 was taught: the edit keeps it a 1
    "digits_composition": {"16": (3, True, 0.7)},  # "bold sks": concept and style composed
    "digits_lora_pruning": {"16": (3, None, 0.8), "20": (3, None, 0.8)},  # pruned, full LoRA
}


@pytest.mark.parametrize("name", list(DRAWS))
def test_digits_workflows_draw_what_they_promise(server, evaluator, name):
    """The graphs a user opens (workflows/*.json queue exactly these, see test_browser.py)."""
    graph = json.loads((API / f"{name}.json").read_text())
    entry = server.run(graph, timeout=900)
    assert "execution_success" in server.messages(entry), server.log_tail()
    for node, (digit, bold, least) in DRAWS[name].items():
        images = saved_digits(server, entry, node)
        right = evaluator.classify(images) == digit
        if bold is not None:
            right &= evaluator.is_bold(images) == bold
        assert len(images) >= 16 and float(right.float().mean()) >= least, \
            (name, node, evaluator.classify(images).tolist(), evaluator.is_bold(images).tolist())
    if name == "digits_concept":  # samples of "sks" at steps 0, 100, 200, 300, shown on the page
        during = saved_digits(server, entry, "16")
        assert len(during) == 4 * 8, len(during)
        last = evaluator.classify(during[-8:]) == 3
        assert float(last.float().mean()) >= 0.8, evaluator.classify(during).tolist()
    if name == "digits_lora_pruning":
        outputs = entry["outputs"]
        n_atoms = int(outputs["8"]["text"][0].split("effects of ")[1].split(" atoms")[0])
        assert outputs["10"]["text"][0].startswith(f"{math.ceil(0.25 * n_atoms)} of {n_atoms} atoms kept")
        grid = outputs["9"]["images"][0]  # the explorer's grid
        assert os.path.getsize(os.path.join(server.base, grid["type"], grid.get("subfolder", ""),
                                            grid["filename"])) > 0


@pytest.mark.parametrize("name, missing", [
    ("sdxl_concept", {"1": "ckpt_name", "2": "folder"}),
    ("sdxl_editing", {"1": "ckpt_name", "2": "image"}),
    ("sdxl_composition", {"1": "ckpt_name", "2": "atoms_name", "3": "atoms_name"}),
    ("sd15_concept", {"1": "ckpt_name", "2": "folder"}),
    ("sd15_editing", {"1": "ckpt_name", "2": "image"}),
])
def test_sdxl_workflows_validate_except_for_the_users_files(server, name, missing):
    """With no SDXL checkpoint here, the only validation errors are the files a user supplies."""
    graph = json.loads((API / f"{name}.json").read_text())
    status, reply = server.queue(graph)
    assert status == 400
    file_errors = ("value_not_in_list", "custom_validation_failed")  # a file that is not there
    errors = {node_id: sorted({e["extra_info"]["input_name"] for e in node["errors"]
                               if e["type"] in file_errors})
              for node_id, node in reply["node_errors"].items()}
    other = [e for node in reply["node_errors"].values() for e in node["errors"]
             if e["type"] not in file_errors]
    assert not other, other
    # ComfyUI stops validating a branch at its first bad input, so it may report only some of them
    assert errors and all(missing.get(node_id) and fields == [missing[node_id]]
                          for node_id, fields in errors.items()), errors


def test_bad_prompt_word_is_refused_before_running(server):
    """A whole digits graph (so ComfyUI validates it) whose positive prompt has an unknown word."""
    graph = {
        "1": {"class_type": "SparseAtoms_LoadDigitsModel", "inputs": {}},
        "2": {"class_type": "SparseAtoms_DigitPrompt", "inputs": {"prompt": "eleven"}},
        "3": {"class_type": "SparseAtoms_DigitPrompt", "inputs": {"prompt": ""}},
        "4": {"class_type": "SparseAtoms_EmptyDigitsLatent", "inputs": {"batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": 0, "steps": 2, "cfg": 3.0, "sampler_name": "euler", "scheduler": "simple",
            "denoise": 1.0}},
        "6": {"class_type": "SparseAtoms_DigitsToImage", "inputs": {"latent": ["5", 0], "scale": 4}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    }
    status, reply = server.queue(graph)
    assert status == 400
    errors = reply["node_errors"]["2"]["errors"]
    assert "'eleven' is not in the digits vocabulary" in json.dumps(errors), errors
    assert list(reply["node_errors"]) == ["2"], reply["node_errors"]


def test_a_failing_node_reports_a_clear_error(server):
    graph = {
        "1": {"class_type": "SparseAtoms_LoadDigitsModel", "inputs": {}},
        "2": {"class_type": "SparseAtoms_BuildDictionary",
              "inputs": {"model": ["1", 0], "preset": "custom regex", "layer_regex": "nothing_here$",
                         "atoms_per_layer": 4, "method": "svd", "seed": 0}},
        "3": {"class_type": "SparseAtoms_TrainConcept",
              "inputs": {"model": ["1", 0], "latents": ["4", 0], "conditioning": ["4", 1],
                         "atom_dict": ["2", 0], "steps": 2, "learning_rate": 0.001, "batch_size": 1,
                         "l1": 0.0, "atom_budget": 0, "tune_atoms": True, "seed": 0,
                         "training_dtype": "fp32", "gradient_checkpointing": False,
                         "prior_weight": 1.0}},
        "4": {"class_type": "SparseAtoms_DigitExamples",
              "inputs": {"digits": "3", "per_digit": 2, "seed": 0, "style": "plain", "prompt": "sks"}},
        "5": {"class_type": "SparseAtoms_Save", "inputs": {"sparse_atoms": ["3", 1], "filename": "x"}},
    }
    entry = server.run(graph)
    assert "execution_error" in server.messages(entry)
    error = next(m[1] for m in entry["status"]["messages"] if m[0] == "execution_error")
    assert error["node_type"] == "SparseAtoms_BuildDictionary"
    assert "selects no layer" in error["exception_message"]
    assert "digits" in error["exception_message"]
