"""The divergence guard through a real ComfyUI server: the digits concept graph at four learning
rates (the cases an outside probe found broken), sampling the concept ("sks" -> a 3) and
preservation ("7" -> a 7) from what Train Sparse Concept returns, judged by the digits
evaluator (fit on real digits only). At the shipped rate (0.003) the node must succeed and draw
both; at the others, whenever the guard stops, the atoms it keeps must still draw both, or the node
must fail saying that no working state was reached."""

import copy
import json
import pathlib

import pytest

from host_support import saved_digits

API = pathlib.Path(__file__).parent / "workflows_api" / "digits_concept.json"
SAMPLES = 32


@pytest.fixture(scope="module")
def evaluator():
    from digits.evaluator import DigitEvaluator

    return DigitEvaluator.fit()


def guarded_graph(lr, steps, dtype):
    """digits_concept.json at ``lr``/``steps``/``dtype``, sampling "sks" and "7" from the
    trained model (SaveImage nodes "sks" and "seven")."""
    graph = copy.deepcopy(json.loads(API.read_text()))
    graph["5"]["inputs"].update(learning_rate=lr, steps=steps, training_dtype=dtype)
    graph["8"]["inputs"]["batch_size"] = SAMPLES
    keep = {"1", "2", "3", "4", "5", "7", "8"}
    graph = {key: node for key, node in graph.items() if key in keep}
    graph["5"]["inputs"].pop("samples")  # the samples during training: not this test's
    for name, prompt in (("sks", "sks"), ("seven", "7")):
        graph[f"{name}_prompt"] = {"class_type": "SparseAtoms_DigitPrompt", "inputs": {"prompt": prompt}}
        graph[f"{name}_sample"] = {"class_type": "KSampler", "inputs": {
            "model": ["5", 0], "positive": [f"{name}_prompt", 0], "negative": ["7", 0],
            "latent_image": ["8", 0], "seed": 0, "steps": 24, "cfg": 3.0, "sampler_name": "euler",
            "scheduler": "simple", "denoise": 1.0}}
        graph[f"{name}_image"] = {"class_type": "SparseAtoms_DigitsToImage",
                                  "inputs": {"latent": [f"{name}_sample", 0], "scale": 1}}
        graph[name] = {"class_type": "SaveImage",
                       "inputs": {"images": [f"{name}_image", 0], "filename_prefix": f"guard_{name}"}}
    return graph


@pytest.mark.parametrize("lr, steps, dtype", [(0.003, 150, "fp32"), (0.03, 300, "fp32"),
                                              (0.1, 150, "fp32"), (0.3, 100, "bf16")],
                         ids=["lr0.003", "lr0.03", "lr0.1", "lr0.3-bf16"])
def test_what_the_guard_keeps_still_draws_the_concept_and_the_other_digits(server, evaluator, lr,
                                                                            steps, dtype):
    entry = server.run(guarded_graph(lr, steps, dtype), timeout=900)
    messages = server.messages(entry)
    if "execution_error" in messages and lr > 0.003:  # the shipped rate must train
        error = next(m[1] for m in entry["status"]["messages"] if m[0] == "execution_error")
        assert error["node_type"] == "SparseAtoms_TrainConcept", error
        assert "no working state was reached" in error["exception_message"], error
        assert "nothing trained is kept" in error["exception_message"]
        assert "sks" not in entry["outputs"]  # nothing was drawn from untrained atoms
        return
    assert "execution_success" in messages, server.log_tail()
    concept = evaluator.share(saved_digits(server, entry, "sks"), 3)
    kept = evaluator.share(saved_digits(server, entry, "seven"), 7)
    assert concept >= 0.8 and kept >= 0.9, (lr, concept, kept, server.log_tail(20))
