"""Expert activation endpoints: mixq's own (/expert_stats...) and SGLang's
(/start|stop|dump_expert_distribution_record).

Every read or reset of the counters runs on the engine thread between two steps
(`AsyncEngine.call`): the counters live on the device and are written by the forward.
"""

from __future__ import annotations

import asyncio
import errno
import time
from pathlib import Path

from fastapi import FastAPI, Query
from pydantic import BaseModel, ConfigDict, Field

from mixq.server.async_engine import AsyncEngine
from mixq.server.errors import APIError
from mixq.tracking.expert_stats import write_json


class ExportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    path: str = Field(min_length=1, max_length=4096,
                      description="a file path under --expert-stats-dir (relative, or absolute inside it)")
    top_k: int = Field(default=10, ge=0, description="an integer >= 0")


def resolve_inside(root: str | Path, requested: str) -> Path:
    """`requested` (relative to `root`, or absolute) as a real path inside `root`.
    PermissionError when it resolves elsewhere: `..`, an absolute path outside, or a
    symlink (anywhere on the way, the file itself included) pointing out."""
    base = Path(root).resolve()
    if "\x00" in requested:
        raise ValueError("path contains a NUL byte")
    target = (base / requested).resolve()  # an absolute `requested` replaces base
    if target == base or not target.is_relative_to(base):
        raise PermissionError(f"path {requested!r} is outside the directory --expert-stats-dir allows ({base})")
    return target


def add_expert_routes(app: FastAPI, aengine: AsyncEngine, stats_dir: str | None) -> None:
    app.state.body_models["/expert_stats/export"] = ExportRequest

    def tracker():
        t = aengine.engine.expert_tracker
        if t is None:
            raise APIError(400, "expert activation tracking is off: restart the server with --enable-expert-tracking "
                                "(and --expert-stats-dir DIR to allow exports)", code="expert_tracking_disabled")
        return t

    async def on_engine(fn):
        try:
            return await aengine.call(fn)
        except ValueError as e:  # a layer/expert id the model does not have
            raise APIError(400, str(e)) from None
        except RuntimeError as e:
            raise APIError(503, str(e), "server_error") from None

    @app.get("/expert_stats")
    async def expert_stats(layer_id: int | None = Query(None, ge=0, description="a MoE layer's index (an integer >= 0)"),
                           expert_id: int | None = Query(None, ge=0, description="an expert's index (an integer >= 0)"),
                           top_k: int = Query(10, ge=0, description="an integer >= 0")):
        t = tracker()
        return await on_engine(lambda: t.stats(layer_id, expert_id, top_k))

    @app.post("/expert_stats/reset")
    async def expert_stats_reset():
        t = tracker()
        await on_engine(t.reset_stats)
        return {"status": "ok", "message": "expert activation stats reset"}

    @app.post("/expert_stats/export")
    async def expert_stats_export(req: ExportRequest):
        t = tracker()
        if stats_dir is None:
            raise APIError(400, "export is off: restart the server with --expert-stats-dir DIR to allow writing "
                                "stats files under DIR", code="expert_stats_dir_unset")
        try:
            target = resolve_inside(stats_dir, req.path)
            is_dir = target.is_dir()
        except PermissionError as e:
            raise APIError(403, str(e), param="path", code="path_not_allowed") from None
        except ValueError as e:
            raise APIError(400, str(e), param="path") from None
        except OSError as e:  # e.g. a name longer than the file system allows
            raise APIError(400, f"path {req.path!r:.80}: {e.strerror}", param="path") from None
        if is_dir:
            raise APIError(400, f"path {req.path!r} is a directory", param="path")
        doc = await on_engine(lambda: t.stats(top_k=req.top_k))
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            await asyncio.to_thread(write_json, target, doc)
        except OSError as e:
            bad_name = e.errno in (errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR, errno.EINVAL, errno.EEXIST)
            raise APIError(400 if bad_name else 500, f"cannot write {req.path!r:.80}: {e.strerror}", param="path",
                           type_=None if bad_name else "server_error") from None
        return {"status": "ok", "path": str(target), "num_experts": len(doc["expert_stats"])}

    # SGLang's recorder API: start clears and records, stop pauses, dump returns the record
    # (and writes it under --expert-stats-dir, when set) and clears it.
    @app.api_route("/start_expert_distribution_record", methods=["GET", "POST"])
    async def start_record():
        t = tracker()
        await on_engine(t.start_record)
        return {"status": "ok", "message": "Start recording the expert distribution.", "recording": True}

    @app.api_route("/stop_expert_distribution_record", methods=["GET", "POST"])
    async def stop_record():
        t = tracker()
        await on_engine(t.stop_record)
        return {"status": "ok", "message": "Stop recording the expert distribution.", "recording": False}

    @app.api_route("/dump_expert_distribution_record", methods=["GET", "POST"])
    async def dump_record():
        t = tracker()

        def take():
            doc = t.stats()
            t.reset_stats()
            return doc

        doc = await on_engine(take)
        path = None
        if stats_dir is not None:
            path = Path(stats_dir).resolve() / f"expert_distribution_recorder_{time.time():.6f}.json"
            await asyncio.to_thread(write_json, path, doc)
        return {"status": "ok", "message": "Dump expert distribution record.", "path": str(path) if path else None,
                "recording": t.recording, "stats": doc}
