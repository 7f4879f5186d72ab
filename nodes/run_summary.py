"""What the frontend (web/shield.js) hears from the pack: run summaries and the Shield Memory reset route.

- When a patch's sampling run ends, the record book calls `publish`, which sends the event
  `shield.run_summary` {node, kind, title, label, samples, samples_touched, steps, steps_touched} (title:
  the method's name from its registered record, core/records.py) to the client
  that queued the prompt. `node` is the id of the graph node that made the patch: patch nodes
  register it (their hidden `unique_id` input) with `register_patch` when they execute.
- `POST /shield/memory/reset` {"memory_id", "store", "redis_url"} empties a Shield Memory;
  `GET /shield/memory/{memory_id}?store=...&redis_url=...` reports its size.

ComfyUI's `server` module is only looked up in `sys.modules`: in-process use (tests, scripts) has no
PromptServer, and then nothing is sent or routed.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Optional

from ..core.bounded_cache import BoundedCache
from ..core.memory_redis import default_url
from ..core.records import RECORDS, RunRecord, touched_summary
from ..core.shield_memory import MEMORY, MemorySpec
from ..core.shield_set import ShieldSetError

logger = logging.getLogger(__name__)

EVENT = "shield.run_summary"
PATCH_NODES: BoundedCache[str, str] = BoundedCache(1024)  # patch id -> graph node id
_routes_added = False


def node_id_of(node_class) -> Optional[str]:
    """The executing node's id (hidden `unique_id` input); None when called outside a prompt."""
    hidden = getattr(node_class, "hidden", None)
    unique_id = getattr(hidden, "unique_id", None)
    return None if unique_id is None else str(unique_id)


def register_patch(patch_id: str, node_id: Optional[str]) -> None:
    """Remember which graph node made the patch `patch_id` (its runs are reported on that node)."""
    if node_id is not None:
        PATCH_NODES.put(patch_id, node_id)


def node_for_patch(patch_id: str) -> Optional[str]:
    return PATCH_NODES.get(patch_id)


def run_message(record: RunRecord) -> Optional[dict[str, Any]]:
    node_id = node_for_patch(record.patch_id)
    if node_id is None:
        return None
    return {"node": node_id, "patch_id": record.patch_id, **touched_summary(record)}


def prompt_server():
    server_module = sys.modules.get("server")
    return getattr(getattr(server_module, "PromptServer", None), "instance", None)


def publish(record: RunRecord) -> None:
    instance = prompt_server()
    message = run_message(record)
    if instance is None or message is None:
        return
    instance.send_sync(EVENT, message, getattr(instance, "client_id", None))


def add_routes() -> None:
    """The Shield Memory routes, once, on the running server (nothing without one)."""
    global _routes_added
    instance = prompt_server()
    if instance is None or _routes_added:
        return
    from aiohttp import web

    @instance.routes.post("/shield/memory/reset")
    async def reset_memory(request):
        try:
            body = await request.json()
        except ValueError:
            body = {}
        body = body if isinstance(body, dict) else {}
        try:
            key = MEMORY.open(_spec_from(body))
            MEMORY.reset(key)
            size, version = len(MEMORY.contents(key)), MEMORY.version(key)
        except ShieldSetError as error:
            return web.json_response({"error": str(error)}, status=400)
        logger.info("Shield Memory %r reset from the frontend", key)
        return web.json_response({"memory_id": body.get("memory_id"), "size": size, "version": version})

    @instance.routes.get("/shield/memory/{memory_id}")
    async def memory_size(request):
        try:
            key = MEMORY.open(_spec_from({**request.query, "memory_id": request.match_info["memory_id"]}))
            size, version = len(MEMORY.contents(key)), MEMORY.version(key)
        except ShieldSetError as error:
            return web.json_response({"error": str(error)}, status=400)
        return web.json_response({"memory_id": request.match_info["memory_id"], "size": size, "version": version})

    _routes_added = True


def install() -> None:
    RECORDS.add_listener(publish)
    add_routes()


def _spec_from(fields) -> MemorySpec:
    """A memory named by the frontend: memory_id, and the node's store and redis_url when not the defaults."""
    store = str(fields.get("store") or "server")
    redis_url = str(fields.get("redis_url") or "").strip()
    if store == "redis" and not redis_url:
        redis_url = default_url()
    return MemorySpec(str(fields.get("memory_id", "")).strip(), store, redis_url=redis_url)
