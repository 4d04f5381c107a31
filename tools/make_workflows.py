"""Regenerate workflows/*.json (UI format) from the API-format graphs in tests/host/workflows_api,
through the real ComfyUI frontend: load each graph with the frontend's own ``loadApiJson``, let it
lay the graph out, and save what the frontend serialises.

    COMFYUI_PATH=/path/to/ComfyUI python tools/make_workflows.py [NAME ...]

With names (e.g. ``sd15_concept``), only those graphs are regenerated.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from browser import frontend_page  # noqa: E402
from comfy_server import ComfyServer  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
API = REPO / "tests" / "host" / "workflows_api"
OUT = REPO / "workflows"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="graphs to regenerate (default: all)")
    names = parser.parse_args(argv).names
    paths = [API / f"{name}.json" for name in names] or sorted(API.glob("*.json"))
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        parser.error(f"no such graph in {API}: {', '.join(missing)}")
    if "COMFYUI_PATH" not in os.environ:
        parser.error("set COMFYUI_PATH to a ComfyUI checkout")
    server = ComfyServer(os.environ["COMFYUI_PATH"]).start()
    try:
        with frontend_page(server.url) as page:
            for path in paths:
                graph = json.loads(path.read_text())
                before = len(page.errors)
                ui = page.evaluate(
                    """async ([graph, name]) => {
                        await window.app.loadApiJson(graph, name);
                        // Shared graphs must reproduce: seeds stay as written.
                        for (const node of window.app.graph.nodes)
                            for (const widget of node.widgets ?? [])
                                if (widget.name === "control_after_generate") widget.value = "fixed";
                        return JSON.stringify(window.app.graph.serialize());  // drops undefined
                    }""", [graph, path.stem])
                ui = json.loads(ui)
                if len(page.errors) > before:
                    print(f"{path.name}: page errors {page.errors[before:]}")
                (OUT / path.name).write_text(json.dumps(ui, indent=1) + "\n")
                print(f"wrote workflows/{path.name}: {len(ui['nodes'])} nodes, {len(ui['links'])} links")
            if page.errors:
                print("page errors:", page.errors)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
