"""The real ComfyUI frontend in headless Chromium: the shipped workflows, and the Atom Mask Editor.

Screenshots go to $SPARSE_ATOMS_SCREENSHOTS (default: the pytest temporary directory).
"""

import base64
import io
import json
import math
import os
import pathlib
import shutil
import time

import numpy as np
import pytest

from browser import CHROMIUM, frontend_page
from comfy_server import ComfyServer
from conftest import COMFYUI_PATH

if not os.path.exists(CHROMIUM):
    pytest.skip(f"browser tests need Debian's chromium at {CHROMIUM}", allow_module_level=True)

WORKFLOWS = pathlib.Path(__file__).resolve().parents[2] / "workflows"
NO_EXTERNAL_MODEL = sorted(p for p in WORKFLOWS.glob("digits_*.json"))
EDITOR = "SparseAtoms_MaskEditor"


@pytest.fixture(scope="module")
def server():
    comfy = ComfyServer(COMFYUI_PATH).start()
    yield comfy
    comfy.stop()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = os.environ.get("SPARSE_ATOMS_SCREENSHOTS")
    path = pathlib.Path(folder) if folder else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_workflow(page, path):
    page.evaluate("async (data) => { await window.app.loadGraphData(data); }",
                  json.loads(path.read_text()))


def queue_and_wait(page, server, timeout=900):
    """Queue from the page (as the Run button does) and wait for the server to finish it."""
    before = set(server.get("/history"))
    page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
    deadline = time.time() + timeout
    while time.time() < deadline:
        new = [pid for pid in server.get("/history") if pid not in before]
        if new:
            entry = server.wait(new[0], timeout=max(1, deadline - time.time()))
            return entry
        time.sleep(0.5)
    raise TimeoutError("the page queued nothing")


def our_errors(page):
    return [e for e in page.errors if "sparse_atoms" in e or "atom_" in e]


def saved_images(server, entry):
    images = []
    for output in entry["outputs"].values():
        for image in output.get("images", []):
            if image["type"] == "output":
                path = os.path.join(server.base, "output", image.get("subfolder", ""), image["filename"])
                from PIL import Image
                images.append(np.asarray(Image.open(path)).astype(np.float32))
    return images


@pytest.mark.parametrize("path", NO_EXTERNAL_MODEL, ids=[p.stem for p in NO_EXTERNAL_MODEL])
def test_shipped_workflows_load_and_run_from_the_page(server, path):
    with frontend_page(server.url) as page:
        load_workflow(page, path)
        missing = page.evaluate("() => window.app.graph.nodes.filter(n => n.has_errors || !n.type).length")
        assert missing == 0
        entry = queue_and_wait(page, server)
        assert "execution_success" in server.messages(entry), server.log_tail()
        assert saved_images(server, entry)
        assert not our_errors(page), page.errors


@pytest.mark.parametrize("path", sorted(WORKFLOWS.glob("sdxl_*.json")), ids=lambda p: p.stem)
def test_sdxl_workflows_load_with_every_node_known(server, path):
    """They need the user's SDXL checkpoint to run; here they must load with no unknown node."""
    with frontend_page(server.url) as page:
        load_workflow(page, path)
        types = page.evaluate("() => window.app.graph.nodes.map(n => [n.type, !!LiteGraph.registered_node_types[n.type]])")
        expected = [node["type"] for node in json.loads(path.read_text())["nodes"]]
        assert sorted(t for t, _ in types) == sorted(expected)
        assert all(known for _, known in types), types
        assert not our_errors(page), page.errors


def editor_state(page):
    return page.evaluate(f"""() => {{
        const node = window.app.graph.nodes.find(n => n.type === "{EDITOR}");
        const canvas = node.atomMaskEditor.canvas;
        return {{
            status: node.atomMaskEditor.status.textContent,
            mask: node.widgets.find(w => w.name === "mask").value,
            density: node.widgets.find(w => w.name === "density").value,
            png: canvas.toDataURL("image/png"),
            rect: (() => {{ const r = canvas.getBoundingClientRect();
                           return [r.left, r.top, r.width, r.height]; }})(),
            rows: node.atomMaskEditor.state.table ? node.atomMaskEditor.state.table.layers.length : 0,
            labelWidth: node.atomMaskEditor.view.labelWidth,
        }};
    }}""")


def canvas_pixels(state):
    from PIL import Image
    data = base64.b64decode(state["png"].split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.float32)


def focus_editor(page):
    """Put the editor node (at its default size) in view."""
    page.evaluate(f"""() => {{
        const node = window.app.graph.nodes.find(n => n.type === "{EDITOR}");
        const canvas = window.app.canvas;
        canvas.ds.scale = 1.2;
        canvas.ds.offset = [-node.pos[0] + 60, -node.pos[1] + 60];
        canvas.setDirty(true, true);
    }}""")
    page.wait_for_timeout(500)


def test_atom_mask_editor_in_the_editing_workflow(server, shots):
    path = WORKFLOWS / "digits_editing.json"
    with frontend_page(server.url) as page:
        load_workflow(page, path)
        # The same graph may have run on this server already; ComfyUI then skips the cached
        # editor node and sends the page no table. A seed of its own makes this run train.
        page.evaluate("""() => {
            const train = window.app.graph.nodes.find(n => n.type === "SparseAtoms_TrainConcept");
            train.widgets.find(w => w.name === "seed").value = 11;
        }""")
        first = queue_and_wait(page, server)
        assert "execution_success" in server.messages(first), server.log_tail()
        page.wait_for_function(f"""() => window.app.graph.nodes.find(n => n.type === "{EDITOR}")
                                          .atomMaskEditor.state.table !== null""", timeout=30000)
        focus_editor(page)
        state = editor_state(page)
        pixels = canvas_pixels(state)
        assert pixels.std() > 10, "the heat-map canvas is blank"
        assert state["rows"] > 0
        kept, total = [int(x) for x in state["status"].split(" atoms kept")[0].split(" / ")]
        assert total > 0 and kept == math.ceil(round(state["density"] * total, 6)), state["status"]
        page.screenshot(path=str(shots / "atom_mask_editor.png"))

        # Clicking cells toggles atoms: the status line and the serialized mask change.
        left, top, width, height = state["rect"]
        labels = state["labelWidth"]
        before = state
        for fraction_x, fraction_y in ((0.2, 0.1), (0.3, 0.5), (0.15, 0.8)):
            page.mouse.click(left + labels + (width - labels) * fraction_x, top + height * fraction_y)
        after_clicks = editor_state(page)
        assert after_clicks["mask"] != before["mask"] and after_clicks["mask"]
        assert after_clicks["status"] != before["status"]
        mask = json.loads(after_clicks["mask"])
        assert mask["version"] == 1 and mask["off"]

        # The density slider changes the selection too.
        page.evaluate(f"""() => {{
            const editor = window.app.graph.nodes.find(n => n.type === "{EDITOR}").atomMaskEditor;
            editor.slider.value = "0.1";
            editor.slider.dispatchEvent(new Event("input"));
        }}""")
        after_slider = editor_state(page)
        assert after_slider["density"] == pytest.approx(0.1)
        assert after_slider["status"] != after_clicks["status"]
        page.screenshot(path=str(shots / "atom_mask_editor_edited.png"))

        # Re-queue: only what depends on the mask re-runs, and the image changes.
        second = queue_and_wait(page, server)
        assert "execution_success" in server.messages(second)
        cached = next(m[1]["nodes"] for m in second["status"]["messages"] if m[0] == "execution_cached")
        train_id = next(n["id"] for n in json.loads(path.read_text())["nodes"]
                        if n["type"] == "SparseAtoms_TrainConcept")
        assert str(train_id) in cached, "training re-ran although only the mask changed"
        one, two = saved_images(server, first)[0], saved_images(server, second)[0]
        assert np.abs(one - two).mean() > 0.5, "re-queuing with another mask gave the same image"
        mask_before_reload = editor_state(page)["mask"]
        assert not our_errors(page), page.errors

        # Reloading the page restores the workflow, and with it the mask.
        page.wait_for_timeout(1500)  # the frontend stores the open workflow as it changes
        page.reload()
        page.wait_for_function("() => window.app && window.app.graph && window.app.graph.nodes.length > 0",
                               timeout=60000)
        page.wait_for_timeout(1000)
        restored = page.evaluate(f"""() => {{
            const node = window.app.graph.nodes.find(n => n.type === "{EDITOR}");
            return node ? node.widgets.find(w => w.name === "mask").value : null;
        }}""")
        assert restored == mask_before_reload


def test_editor_redraws_an_sdxl_size_table_quickly_and_cleans_up(server, shots):
    with frontend_page(server.url) as page:
        load_workflow(page, WORKFLOWS / "digits_editing.json")
        focus_editor(page)
        timing = page.evaluate(f"""() => {{
            const node = window.app.graph.nodes.find(n => n.type === "{EDITOR}");
            const layers = [];
            for (let r = 0; r < 700; r++) {{
                const importance = Array.from({{length: 64}}, (_, c) => Math.exp(-c / 9) * (1 + (r % 7)));
                layers.push({{key: `diffusion_model.block.${{r}}.attn2.to_k`, label: `L${{r}}`,
                              name: `block.${{r}}.attn2.to_k`, group: `block.${{Math.floor(r / 10)}}`,
                              atoms: Array.from({{length: 64}}, (_, c) => c), importance,
                              kept: Array(64).fill(true)}});
            }}
            const table = {{fingerprint: "synthetic", layers, min: Math.exp(-63 / 9), max: 7,
                           total: 1, palette: [[68,1,84],[59,82,139],[33,145,140],[94,201,98],[253,231,37]]}};
            node.atomMaskEditor.setTable(table);
            const start = performance.now();
            for (let i = 0; i < 10; i++) node.atomMaskEditor.render();
            return (performance.now() - start) / 10;
        }}""")
        page.screenshot(path=str(shots / "atom_mask_editor_sdxl_size.png"))
        (shots / "redraw_700x64_ms.txt").write_text(f"{timing:.2f}\n")
        assert timing < 100, f"one redraw of 700 x 64 atoms took {timing:.1f} ms"
        tooltips_before = page.evaluate("() => document.querySelectorAll('.sparse-atoms-tooltip').length")
        page.evaluate(f"""() => {{
            const node = window.app.graph.nodes.find(n => n.type === "{EDITOR}");
            window.app.graph.remove(node);
        }}""")
        tooltips_after = page.evaluate("() => document.querySelectorAll('.sparse-atoms-tooltip').length")
        assert tooltips_after == tooltips_before - 1


def test_widget_colours_match_the_importance_image(server):
    """The node's IMAGE output and the widget draw the same table with the same colours."""
    import torch
    import sparse_core as sc
    from sparse_core._heatmap import PALETTE, colours

    values = [0.0, 1e-4, 3e-3, 0.02, 0.1, 0.5, 1.0, 2.0]
    low, high = 1e-3, 1.0
    with frontend_page(server.url) as page:
        js = page.evaluate("""async ([values, low, high, palette]) => {
            const module = await import("/extensions/sparse_atoms/atom_heatmap.js");
            return values.map(v => module.colour(v, low, high, palette));
        }""", [values, low, high, PALETTE])
    python = colours(torch.tensor(values), low, high).round().int().tolist()
    assert js == python
