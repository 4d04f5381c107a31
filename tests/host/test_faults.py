"""Faults on a real ComfyUI server: /interrupt during training, kill -9 during saves, and 20
prompts back to back (the server's memory stays bounded)."""

import asyncio
import glob
import json
import os
import re
import signal
import threading
import time

import pytest

import sparse_core as sc
from comfy_server import ComfyServer
from host_support import COMFYUI_PATH

TEMP = re.compile(r"\.sparse-atoms-[0-9a-f]{16}-\d+-[0-9a-f]{16}\.tmp")


class Messages:
    """The server's websocket messages to this client, collected in a background thread."""

    def __init__(self, server):
        self.items = []
        self.ready = threading.Event()
        url = server.url.replace("http://", "ws://") + f"/ws?clientId={server.client_id}"
        threading.Thread(target=asyncio.run, args=(self._listen(url),), daemon=True).start()
        assert self.ready.wait(30), "the websocket did not connect"

    async def _listen(self, url):
        import aiohttp

        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(url) as socket:
                self.ready.set()
                async for message in socket:
                    if message.type == aiohttp.WSMsgType.TEXT:
                        self.items.append(json.loads(message.data))

    def wait_for(self, predicate, timeout):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(predicate(item) for item in list(self.items)):
                return
            time.sleep(0.05)
        raise TimeoutError(f"no such message within {timeout} s; last: {self.items[-3:]}")


def training_graph(steps, seed=0, filename="after_training"):
    """Digits examples -> Build Atom Dictionary -> Train Sparse Concept ("4") -> Save."""
    return {
        "1": {"class_type": "SparseAtoms_LoadDigitsModel", "inputs": {}},
        "2": {"class_type": "SparseAtoms_DigitExamples",
              "inputs": {"digits": "3", "per_digit": 2, "seed": seed, "style": "plain", "prompt": "sks"}},
        "3": {"class_type": "SparseAtoms_BuildDictionary",
              "inputs": {"model": ["1", 0], "preset": "cross-attention k/v", "layer_regex": "",
                         "atoms_per_layer": 8, "method": "svd", "seed": 0}},
        "4": {"class_type": "SparseAtoms_TrainConcept",
              "inputs": {"model": ["1", 0], "latents": ["2", 0], "conditioning": ["2", 1],
                         "atom_dict": ["3", 0], "steps": steps, "learning_rate": 0.003, "batch_size": 1,
                         "l1": 0.0, "atom_budget": 0, "tune_atoms": True, "seed": seed,
                         "training_dtype": "fp32", "gradient_checkpointing": False, "prior_weight": 1.0}},
        "5": {"class_type": "SparseAtoms_Save", "inputs": {"sparse_atoms": ["4", 1], "filename": filename}},
    }


def atoms_folder(server):
    return os.path.join(server.base, "models", "sparse_atoms")


def test_interrupt_during_training_keeps_the_last_completed_step(server):
    messages = Messages(server)
    status, reply = server.queue(training_graph(steps=100000, filename="never_written"))
    assert status == 200, reply
    messages.wait_for(lambda m: m.get("type") == "progress" and m["data"].get("node") == "4"
                      and m["data"]["value"] >= 3, timeout=300)
    assert server.post("/interrupt", {})[0] == 200
    entry = server.wait(reply["prompt_id"], timeout=120)
    assert "execution_interrupted" in server.messages(entry), server.messages(entry)
    saved = glob.glob(os.path.join(atoms_folder(server), "interrupted", "*.safetensors"))
    assert len(saved) == 1, saved
    atoms = sc.load_atoms(saved[0])
    assert atoms.n_atoms == 64  # the whole dictionary: 4 blocks x to_k, to_v x 8 atoms
    coefficients = [layer.coefficients for layer in atoms.layers.values()]
    assert all(bool(c.isfinite().all()) for c in coefficients)
    assert any(bool(c.abs().sum() > 0) for c in coefficients), "no completed step was kept"
    assert not glob.glob(os.path.join(atoms_folder(server), "never_written*"))


def saves_graph(prefix, copies):
    """The atoms of every attention and MLP layer after one training step (about 1.4 MB as a
    file), saved ``copies`` times (the training is cached after the first prompt)."""
    graph = training_graph(steps=1, filename=f"{prefix}_0")
    graph["3"]["inputs"].update(preset="attention + MLP", atoms_per_layer=64)
    for i in range(1, copies):
        graph[str(10 + i)] = {"class_type": "SparseAtoms_Save",
                              "inputs": {"sparse_atoms": ["4", 1], "filename": f"{prefix}_{i}"}}
    return graph


def temp_files(folder):
    return sorted(name for name in os.listdir(folder) if TEMP.fullmatch(name)) if os.path.isdir(folder) else []


def kill_during_a_save(base, attempt) -> list[str]:
    """Start a server on ``base``, queue saves in a loop and kill -9 it the moment a temporary
    file appears; return the temporary files it left."""
    server = ComfyServer(COMFYUI_PATH, base=base).start()
    folder = atoms_folder(server)
    try:
        for i in range(8):
            status, reply = server.queue(saves_graph(f"loop{attempt}_{i}", copies=6))
            assert status == 200, reply
        deadline = time.time() + 300
        while time.time() < deadline and not temp_files(folder):
            time.sleep(0.001)  # a save of these atoms lasts tens of milliseconds
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait(30)
    finally:
        server.stop()
        server._log.close()
    return temp_files(folder)


@pytest.mark.slow  # two server starts and a kill: about a minute
def test_kill_9_during_saves_then_a_clean_restart(tmp_path):
    base = str(tmp_path / "comfy")
    left = []
    for attempt in range(3):  # the kill may land just after a save finished; then try again
        left = kill_during_a_save(base, attempt)
        if left:
            break
    assert left, "no kill landed during a save in 3 tries"
    folder = os.path.join(base, "models", "sparse_atoms")
    finished = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    for path in finished:  # every file under a final name is whole
        sc.load_atoms(path)

    server = ComfyServer(COMFYUI_PATH, base=base).start()
    try:
        listed = server.get("/object_info/SparseAtoms_Load")["SparseAtoms_Load"]["input"]["required"]["atoms_name"]
        names = listed[0] if isinstance(listed[0], list) else listed[1]["options"]
        assert sorted(names) == sorted(os.path.basename(p) for p in finished)
        graph = saves_graph("after_restart", copies=1)  # a saver runs: it cleans up
        if names:  # and a file saved before the kill loads in the node
            graph["20"] = {"class_type": "SparseAtoms_Load", "inputs": {"atoms_name": names[0]}}
            graph["21"] = {"class_type": "SparseAtoms_Save", "inputs": {"sparse_atoms": ["20", 0],
                                                                        "filename": "reloaded"}}
        entry = server.run(graph, timeout=300)
        assert "execution_success" in server.messages(entry), server.log_tail()
        assert temp_files(folder) == [], "a saver ran after the restart and left the old temporary files"
        assert glob.glob(os.path.join(folder, "after_restart_0_*.safetensors"))
    finally:
        server.stop()


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as stream:
        return int(re.search(r"VmRSS:\s+(\d+) kB", stream.read())[1]) / 1024


def editing_graph(seed):
    """Train (a few steps) -> Atom Mask Editor -> Apply -> sample -> save the image and the atoms;
    a new seed each time, so nothing but the model comes from the cache."""
    graph = training_graph(steps=4, seed=seed, filename=f"memory_{seed}")
    graph.update({
        "6": {"class_type": "SparseAtoms_MaskEditor",
              "inputs": {"sparse_atoms": ["4", 1], "mask": "", "density": 0.5}},
        "7": {"class_type": "SparseAtoms_Apply",
              "inputs": {"model": ["1", 0], "sparse_atoms": ["6", 0], "strength": 1.0, "density": 1.0}},
        "8": {"class_type": "SparseAtoms_DigitPrompt", "inputs": {"prompt": "sks"}},
        "9": {"class_type": "SparseAtoms_DigitPrompt", "inputs": {"prompt": ""}},
        "10": {"class_type": "SparseAtoms_EmptyDigitsLatent", "inputs": {"batch_size": 4}},
        "11": {"class_type": "KSampler", "inputs": {
            "model": ["7", 0], "positive": ["8", 0], "negative": ["9", 0], "latent_image": ["10", 0],
            "seed": seed, "steps": 4, "cfg": 3.0, "sampler_name": "euler", "scheduler": "simple",
            "denoise": 1.0}},
        "12": {"class_type": "SparseAtoms_DigitsToImage", "inputs": {"latent": ["11", 0], "scale": 4}},
        "13": {"class_type": "SaveImage", "inputs": {"images": ["12", 0], "filename_prefix": "memory"}},
        "14": {"class_type": "PreviewImage", "inputs": {"images": ["6", 1]}},
    })
    return graph


# After a few warm-up prompts (caches, allocator pools), 15 more may add at most this much.
MEMORY_GROWTH_LIMIT_MB = 10


def test_twenty_prompts_back_to_back_leak_no_memory(server):
    pid = server.process.pid
    rss = []
    for seed in range(20):
        entry = server.run(editing_graph(1000 + seed), timeout=300)
        assert "execution_success" in server.messages(entry), server.log_tail()
        rss.append(rss_mb(pid))
    growth = rss[-1] - rss[4]
    assert growth < MEMORY_GROWTH_LIMIT_MB, f"RSS after each prompt (MB): {[round(r) for r in rss]}"
