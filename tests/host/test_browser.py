"""The real ComfyUI frontend in headless Chromium: the shipped workflows, and the Atom Mask Editor.

Screenshots go to $SPARSE_ATOMS_SCREENSHOTS (default: the pytest temporary directory).
"""

import base64
import copy
import io
import json
import math
import os
import pathlib
import time
import urllib.error

import numpy as np
import pytest

from browser import CHROMIUM, frontend_page

if not os.path.exists(CHROMIUM):
    pytest.skip(f"browser tests need Debian's chromium at {CHROMIUM}", allow_module_level=True)

WORKFLOWS = pathlib.Path(__file__).resolve().parents[2] / "workflows"
API = pathlib.Path(__file__).parent / "workflows_api"
NO_EXTERNAL_MODEL = sorted(p for p in WORKFLOWS.glob("digits_*.json"))
EDITOR = "SparseAtoms_MaskEditor"


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


def wait_for_table(page):
    """Until the editor widget holds its table."""
    page.wait_for_function(f"""() => window.app.graph.nodes.find(n => n.type === "{EDITOR}")
                                      .atomMaskEditor.state.table !== null""", timeout=30000)


def queue_and_read_editor(page, server):
    """Queue the graph, check it ran, wait for the editor's table: (history entry, widget state)."""
    entry = queue_and_wait(page, server)
    assert "execution_success" in server.messages(entry), server.log_tail()
    wait_for_table(page)
    focus_editor(page)
    return entry, editor_state(page)


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


def as_saved_by_newer_comfyui(workflow: dict) -> dict:
    """``workflow`` as newer ComfyUI saves it: TrainLoraNode's outputs are lora, loss_map, steps
    (upstream ``comfy_extras/nodes_train.py``), so its links leave from output 0, not 1."""
    saved = copy.deepcopy(workflow)
    node = next(n for n in saved["nodes"] if n["type"] == "TrainLoraNode")
    outputs = {o["name"]: o for o in node["outputs"]}
    node["outputs"] = [outputs["lora"], dict(outputs["loss"], name="loss_map"), outputs["steps"]]
    for slot, output in enumerate(node["outputs"]):
        output["slot_index"] = slot
    for link in saved["links"]:
        if link[1] == node["id"]:
            link[2] = 0
    return saved


def test_a_graph_saved_by_newer_comfyui_queues_the_lora_from_its_moved_output(server):
    """digits_lora_pruning.json as newer ComfyUI saves it: without the repair the page would queue
    TrainLoraNode's MODEL (output 0 here) where LoRA to Sparse Atoms takes the LoRA; the extension
    moves the links to the one output of that type, so the page queues the graph test_server.py
    judges."""
    path = WORKFLOWS / "digits_lora_pruning.json"
    with frontend_page(server.url) as page:
        page.evaluate("async (data) => { await window.app.loadGraphData(data); }",
                      as_saved_by_newer_comfyui(json.loads(path.read_text())))
        prompt = page.evaluate("async () => (await window.app.graphToPrompt()).output")
        assert not our_errors(page), page.errors
    expected = json.loads((API / "digits_lora_pruning.json").read_text())
    assert {k: v["inputs"] for k, v in prompt.items()} == {k: v["inputs"] for k, v in expected.items()}


@pytest.mark.parametrize("path", NO_EXTERNAL_MODEL, ids=[p.stem for p in NO_EXTERNAL_MODEL])
def test_shipped_workflows_queue_exactly_the_graphs_the_server_tests_judge(server, path):
    """What the page's Run button sends for each shipped digits workflow (``graphToPrompt``) is
    ``tests/host/workflows_api/<name>.json``, which test_server.py runs and judges by what it
    draws; the editing workflow is also queued from this page and run by the editor test below."""
    with frontend_page(server.url) as page:
        load_workflow(page, path)
        missing = page.evaluate("() => window.app.graph.nodes.filter(n => n.has_errors || !n.type).length")
        assert missing == 0
        prompt = page.evaluate("async () => (await window.app.graphToPrompt()).output")
        assert not our_errors(page), page.errors
    queued = {node_id: {"class_type": node["class_type"], "inputs": node["inputs"]}
              for node_id, node in prompt.items()}
    expected = {node_id: {"class_type": node["class_type"], "inputs": node["inputs"]}
                for node_id, node in json.loads((API / f"{path.stem}.json").read_text()).items()}
    assert queued == expected  # titles (_meta) aside


@pytest.mark.parametrize("path", sorted([*WORKFLOWS.glob("sdxl_*.json"), *WORKFLOWS.glob("sd15_*.json")]),
                         ids=lambda p: p.stem)
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
        first, state = queue_and_read_editor(page, server)
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
        density_before_reload = editor_state(page)["density"]
        assert not our_errors(page), page.errors

        # A reload restores the workflow, its mask and the table (kept with the node), without
        # running anything; then one nudge of the density slider keeps the mask.
        runs = len(server.get("/history"))
        page.wait_for_timeout(1500)  # the frontend stores the open workflow as it changes
        reload_page(page)
        restored = editor_state(page)
        assert restored["mask"] == mask_before_reload
        assert restored["density"] == pytest.approx(density_before_reload)
        assert restored["rows"] > 0, f"no table after a reload: {restored['status']}"
        assert " atoms kept" in restored["status"], restored["status"]
        nudge_density(page, 0.25)
        nudged = editor_state(page)
        assert nudged["mask"] == mask_before_reload, "a density nudge after a reload changed the mask"
        assert nudged["density"] == pytest.approx(0.25)

        # A table too large for the workflow keeps only its id there; the server hands it back.
        page.wait_for_timeout(1500)
        stored = drop_stored_tables(page)
        assert stored, "the open workflow was not stored with the table's id"
        reload_page(page)
        wait_for_table(page)
        fetched = editor_state(page)
        assert fetched["mask"] == mask_before_reload and fetched["rows"] == restored["rows"]
        assert len(server.get("/history")) == runs, "the table came back by re-running the graph"
        assert not our_errors(page), page.errors


def reload_page(page):
    page.reload()
    page.wait_for_function(f"""() => window.app && window.app.graph &&
                                     window.app.graph.nodes.some(n => n.type === "{EDITOR}")""",
                           timeout=60000)
    page.wait_for_timeout(1000)


def nudge_density(page, value):
    """Move the density slider as a user does (one input event)."""
    page.evaluate(f"""(value) => {{
        const editor = window.app.graph.nodes.find(n => n.type === "{EDITOR}").atomMaskEditor;
        editor.slider.value = String(value);
        editor.slider.dispatchEvent(new Event("input"));
    }}""", value)


def drop_stored_tables(page):
    """Remove the table (not its id) from the stored copies of the open workflow; return how many
    stored copies name a table id."""
    return page.evaluate("""() => {
        let withId = 0;
        const stores = [[localStorage, "workflow"],
                        ...Object.keys(sessionStorage).filter(k => k.startsWith("workflow:"))
                               .map(k => [sessionStorage, k])];
        for (const [store, key] of stores) {
            const text = store.getItem(key);
            if (!text) continue;
            const workflow = JSON.parse(text);
            for (const node of workflow.nodes) {
                if (!node.properties) continue;
                delete node.properties.sparse_atoms_table;
                if (node.properties.sparse_atoms_table_id) withId += 1;
            }
            store.setItem(key, JSON.stringify(workflow));
        }
        return withId;
    }""")


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
            for (let i = 0; i < 10; i++) node.atomMaskEditor.draw();
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


def click_button(page, name):
    page.evaluate(f"""() => window.app.graph.nodes.find(n => n.type === "{EDITOR}")
                              .atomMaskEditor.canvas.parentElement.querySelector(".sparse-atoms-{name}").click()""")


def editing_workflow_with(mask, density=0.3, properties=None):
    """digits_editing.json whose editor node holds ``mask``/``density`` and ``properties``, as a
    page reload restores it."""
    workflow = json.loads((WORKFLOWS / "digits_editing.json").read_text())
    node = next(n for n in workflow["nodes"] if n["type"] == EDITOR)
    node["widgets_values"] = [mask, density]
    node["properties"] = {**node.get("properties", {}), **(properties or {})}
    return workflow


def small_table(fingerprint):
    """A two-layer table as the node sends it (atoms 0..2 per layer)."""
    rows = [{"key": f"diffusion_model.blocks.{r}.attn2.to_k", "label": f"L{r}",
             "name": f"blocks.{r}.attn2.to_k", "group": f"blocks.{r}", "atoms": [0, 1, 2],
             "importance": [3.0 - r, 2.0 - r, 1.0], "effect": [None] * 3,
             "weight_norm": [3.0 - r, 2.0 - r, 1.0], "kept": [True] * 3} for r in range(2)]
    return {"id": "0" * 32, "fingerprint": fingerprint, "layers": rows, "importance_kind": "weight norm",
            "ranked_by": "ranked by weight norm (no measured effects in these atoms)", "effects": "",
            "min": 1.0, "max": 3.0, "total": 10.0,
            "palette": [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]]}


def test_nothing_is_written_before_the_table_is_known(server):
    """A saved mask survives a density nudge while the node has no table (a reload of a workflow
    whose table is not kept, or no longer on the server), and a mask that is not valid JSON is
    reported as such, not as one made for other atoms."""
    mask = json.dumps({"fingerprint": "f" * 64, "off": {"diffusion_model.blocks.0.attn2.to_k": [1]},
                       "version": 1})
    cases = [({}, "No atoms yet: queue the graph once. The saved mask is kept as it is."),
             ({"sparse_atoms_table_id": "e" * 32},
              "This node's atom table is no longer on the server: queue the graph once. "
              "The saved mask is kept as it is.")]
    with frontend_page(server.url) as page:
        for properties, status in cases:
            page.evaluate("async (data) => { await window.app.loadGraphData(data); }",
                          editing_workflow_with(mask, 0.3, properties))
            page.wait_for_timeout(500)
            nudge_density(page, 0.8)
            click_button(page, "all")  # disabled: does nothing
            state = editor_state(page)
            assert (state["mask"], state["density"]) == (mask, pytest.approx(0.3)), properties
            assert state["status"] == status

        # Not valid JSON: said so (with or without a table), and reset clears it.
        page.evaluate("async (data) => { await window.app.loadGraphData(data); }",
                      editing_workflow_with('{"version": 1, "off": ', 0.3))
        page.wait_for_timeout(500)
        assert editor_state(page)["status"].startswith("The mask is not valid JSON (")
        page.evaluate(f"""(table) => window.app.graph.nodes.find(n => n.type === "{EDITOR}")
                                      .atomMaskEditor.setTable(table)""", small_table("f" * 64))
        state = editor_state(page)
        assert state["status"].startswith("The mask is not valid JSON ("), state["status"]
        assert "other atoms" not in state["status"]
        nudge_density(page, 0.8)
        assert editor_state(page)["mask"] == '{"version": 1, "off": '
        click_button(page, "reset")
        state = editor_state(page)
        assert (state["mask"], state["density"]) == ("", 1.0)
        assert state["status"].startswith("6 / 6 atoms kept"), state["status"]

        # A mask for other atoms is said so and left alone until reset.
        page.evaluate(f"""([mask, table]) => {{
            const node = window.app.graph.nodes.find(n => n.type === "{EDITOR}");
            node.widgets.find(w => w.name === "mask").value = mask;
            node.atomMaskEditor.syncFromWidgets();
            node.atomMaskEditor.setTable(table);
        }}""", [mask, small_table("0" * 64)])
        nudge_density(page, 0.5)
        state = editor_state(page)
        assert state["status"] == "This mask was made for other atoms: press reset to clear it."
        assert (state["mask"], state["density"]) == (mask, 1.0)
        assert not our_errors(page), page.errors


EFFECTS_INFO = {"method": "exact ablation", "calibration": "4 latents x 2 noise levels",
                "metric": "rms change of the model prediction"}


def write_atoms_file(server, name, with_effects):
    """Two layers of 4 atoms: weight norms 1..4 (to_k) and 0.1..0.4 (to_v); effects the other way
    round (to_v's atoms matter most, each layer's largest weight norm least)."""
    import torch
    import sparse_core as sc

    weight = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    keys = ["diffusion_model.blocks.0.attn2.to_k", "diffusion_model.blocks.0.attn2.to_v"]
    atoms = sc.build_atoms({key: weight for key in keys}, 4, "svd")
    for key, scale, effect in ((keys[0], 1.0, 0.01), (keys[1], 0.1, 10.0)):
        atoms[key].coefficients.copy_(scale * torch.arange(1.0, 5.0))
        if with_effects:
            atoms[key].effect = effect * torch.arange(4.0, 0.0, -1.0)
    if with_effects:
        atoms.info.effects = dict(EFFECTS_INFO)
    path = os.path.join(server.base, "models", "sparse_atoms", f"{name}.safetensors")
    sc.save_atoms(atoms, path)
    assert sc.load_atoms(path).importance_kind == ("effect" if with_effects else "weight norm"), \
        "the atoms file does not keep the effects"
    return f"{name}.safetensors"


def cell_colour_and_tooltip(page, r, c):
    """The canvas colour at the centre of cell (r, c) and the tooltip when the mouse is there."""
    geometry = page.evaluate(f"""([r, c]) => {{
        const editor = window.app.graph.nodes.find(n => n.type === "{EDITOR}").atomMaskEditor;
        const rect = editor.canvas.getBoundingClientRect();
        const table = editor.state.table;
        const columns = Math.max(...table.layers.map(row => row.atoms.length));
        const x = editor.view.labelWidth + (c + 0.5) * (rect.width - editor.view.labelWidth) / columns;
        const y = (r + 0.5) * rect.height / table.layers.length;
        const ratio = editor.canvas.width / rect.width;
        const pixel = editor.canvas.getContext("2d").getImageData(Math.floor(x * ratio), Math.floor(y * ratio), 1, 1).data;
        return [rect.left + x, rect.top + y, [pixel[0], pixel[1], pixel[2]]];
    }}""", [r, c])
    x, y, rgb = geometry
    page.mouse.move(x, y)
    page.wait_for_timeout(100)
    tooltip = page.evaluate("() => document.querySelector('.sparse-atoms-tooltip').textContent")
    return rgb, tooltip


def test_editor_ranks_and_colours_by_measured_effect(server):
    import re
    from sparse_core._heatmap import PALETTE

    files = {True: write_atoms_file(server, "browser_effects", True),
             False: write_atoms_file(server, "browser_norms", False)}
    with frontend_page(server.url) as page:
        page.evaluate(f"""(name) => {{
            const graph = window.app.graph;
            graph.clear();
            const load = LiteGraph.createNode("SparseAtoms_Load");
            const editor = LiteGraph.createNode("{EDITOR}");
            const preview = LiteGraph.createNode("PreviewImage");
            [load, editor, preview].forEach((node, i) => {{ graph.add(node); node.pos = [i * 600, 100]; }});
            load.widgets.find(w => w.name === "atoms_name").value = name;
            load.connect(0, editor, 0);
            editor.connect(1, preview, 0);
        }}""", files[True])
        entry, state = queue_and_read_editor(page, server)
        assert state["status"] == ("8 / 8 atoms kept · 100.0% of the total effect · "
                                   "ranked by measured effect"), state["status"]
        title = page.evaluate(f"""() => window.app.graph.nodes.find(n => n.type === "{EDITOR}")
                                         .atomMaskEditor.status.title""")
        assert title == "exact ablation on 4 latents x 2 noise levels (rms change of the model prediction)"
        # to_v (row 1) holds the largest effect (40, brightest), to_k's last column the smallest.
        brightest, tooltip = cell_colour_and_tooltip(page, 1, 0)
        assert brightest == list(PALETTE[-1])
        effect, norm = map(float, re.search(r"effect (\S+)  weight norm (\S+)", tooltip).groups())
        assert (effect, norm) == (pytest.approx(40.0), pytest.approx(0.1, rel=1e-3)), tooltip
        assert tooltip.startswith("L1[0]") and "ranked by measured effect" in tooltip
        darkest, tooltip = cell_colour_and_tooltip(page, 0, 3)
        assert darkest == list(PALETTE[0])
        effect, norm = map(float, re.search(r"effect (\S+)  weight norm (\S+)", tooltip).groups())
        assert (effect, norm) == (pytest.approx(0.01), pytest.approx(4.0, rel=1e-3)), tooltip

        # The node's text says the same; the table is served by its id.
        output = next(o for o in entry["outputs"].values() if "atom_table" in o)
        assert output["text"] == ["8 of 8 atoms kept; ranked by measured effect (exact ablation on 4 "
                                  "latents x 2 noise levels (rms change of the model prediction))"]
        table = output["atom_table"][0]
        served = server.get(f"/sparse_atoms/atom_table/{table['id']}")
        assert served["layers"][1]["effect"] == table["layers"][1]["effect"]
        assert all("kept" not in row for row in served["layers"])
        for path, code in ((f"/sparse_atoms/atom_table/{'a' * 32}", 404), ("/sparse_atoms/atom_table/x", 400)):
            with pytest.raises(urllib.error.HTTPError) as error:
                server.get(path)
            assert error.value.code == code

        # Atoms without effects: ranked by weight norm, and said so.
        page.evaluate("""(name) => {
            window.app.graph.nodes.find(n => n.type === "SparseAtoms_Load")
                .widgets.find(w => w.name === "atoms_name").value = name;
        }""", files[False])
        entry = queue_and_wait(page, server)
        assert "execution_success" in server.messages(entry), server.log_tail()
        page.wait_for_function(f"""() => window.app.graph.nodes.find(n => n.type === "{EDITOR}")
                                          .atomMaskEditor.state.table.importance_kind === "weight norm" """,
                               timeout=30000)
        state = editor_state(page)
        assert state["status"] == ("8 / 8 atoms kept · 100.0% of the total weight norm · ranked by "
                                   "weight norm (no measured effects in these atoms)"), state["status"]
        brightest, tooltip = cell_colour_and_tooltip(page, 0, 0)
        assert brightest == list(PALETTE[-1])
        assert tooltip.startswith("L0[3]  effect not measured  weight norm 4.000"), tooltip
        output = next(o for o in entry["outputs"].values() if "atom_table" in o)
        assert output["text"] == ["8 of 8 atoms kept; ranked by weight norm (no measured effects in "
                                  "these atoms)"]
        assert not our_errors(page), page.errors
