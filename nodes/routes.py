"""The Atom Mask Editor's tables over HTTP, so a reloaded page gets its table back without
re-running anything: ``GET /sparse_atoms/atom_table/{table_id}``.

The editor node keeps its table with the node in the workflow when the table is small (the
widget's ``node.properties``); larger tables are served from here. The server keeps the last
:data:`MAX_TABLES` tables (at most :data:`MAX_BYTES` of JSON) in memory, keyed by a digest of
their content, and forgets them when it stops. Importing this module registers nothing;
:func:`register` adds the route to ComfyUI's server (called from the package's entry point).
"""

from __future__ import annotations

import collections
import hashlib
import json
import re
import threading

MAX_TABLES = 16
MAX_BYTES = 64 * 2**20
ROUTE = "/sparse_atoms/atom_table/{table_id}"
_ID = re.compile(r"[0-9a-f]{32}")

_tables: "collections.OrderedDict[str, str]" = collections.OrderedDict()  # table id -> JSON text
_lock = threading.Lock()


def remember(table: dict) -> str:
    """Keep ``table`` (the node's importance table) for the route; sets and returns
    ``table["id"]``, a digest of everything the widget uses (not the ``kept`` flags, which the
    widget recomputes from the mask)."""
    shown = {**table, "layers": [{k: v for k, v in row.items() if k != "kept"} for row in table["layers"]]}
    shown.pop("id", None)
    text = json.dumps(shown, sort_keys=True, allow_nan=False)
    table_id = hashlib.sha256(text.encode()).hexdigest()[:32]
    shown["id"] = table_id
    text = json.dumps(shown, sort_keys=True, allow_nan=False)
    with _lock:
        _tables.pop(table_id, None)
        _tables[table_id] = text
        while len(_tables) > 1 and (len(_tables) > MAX_TABLES
                                    or sum(len(t) for t in _tables.values()) > MAX_BYTES):
            _tables.popitem(last=False)
    table["id"] = table_id
    return table_id


def lookup(table_id: str) -> str | None:
    """The JSON text of a remembered table, or None."""
    with _lock:
        return _tables.get(table_id)


def register(server) -> None:
    """Add the route to ComfyUI's ``PromptServer`` (a no-op when there is none, e.g. in tests
    that load the nodes without a server)."""
    if server is None:
        return
    from aiohttp import web

    @server.routes.get(ROUTE)
    async def atom_table(request):
        table_id = request.match_info["table_id"]
        if not _ID.fullmatch(table_id):
            return web.json_response({"error": f"table id must be 32 hex digits, got {table_id[:40]!r}"},
                                     status=400)
        text = lookup(table_id)
        if text is None:
            return web.json_response({"error": f"no table {table_id} on this server (it keeps the last "
                                               f"{MAX_TABLES}); queue the graph to make it again"},
                                     status=404)
        return web.Response(text=text, content_type="application/json")
