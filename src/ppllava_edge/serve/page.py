"""The chat page and what it needs besides /v1/chat/completions.

    GET /               the page (static/index.html; no key needed: it holds no data, its API calls carry the key)
    GET /static/...     its CSS and JS, shipped inside the package (no CDN, no build step)
    GET /v1/media       the files a request may name (under --media-dir) and the server's limits; authenticated like
                        every /v1 route

`relevance_extra` builds the answer's `relevance` field (request field `"return_relevance": true`).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..media import IMAGE_EXTENSIONS, PreprocessSpec
from ..relevance import relevance_json, relevance_kind
from .inputs import MIME_SUFFIX
from .protocol import ApiError

STATIC = Path(__file__).with_name("static")
MEDIA_SUFFIXES = frozenset(MIME_SUFFIX.values()) | frozenset(IMAGE_EXTENSIONS) | {".m4v", ".mpeg"}
MAX_LISTED = 1000  # files listed at most (the listing says when it stopped)
MAX_VISITED = 20000  # directory entries looked at, at most (a huge tree of other files stops the walk too)
MAX_DEPTH = 4  # sub-folder levels walked below each media dir
# the page loads nothing from elsewhere; thumbnails are data: URLs, an upload preview a blob: URL
CSP = ("default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob:; style-src 'self'; script-src 'self'; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'")
PAGE_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


def media_kind(suffix: str) -> str:
    return "npy" if suffix == ".npy" else "image" if suffix in IMAGE_EXTENSIONS else "video"


def list_media(media_dirs: list[Path], inside: Callable[[Path], bool]) -> tuple[list[dict], bool]:
    """Files with a media suffix under the media dirs (hidden entries skipped, at most MAX_DEPTH levels, symlinks
    kept only when they resolve inside a media dir). `name` is relative to its dir, which is how a request names
    it; when two dirs hold the same name the first dir wins, as in MediaPolicy. Returns (entries, truncated)."""
    seen: dict[str, dict] = {}
    visited = 0
    for root in media_dirs:
        for dirpath, dirnames, filenames in os.walk(root):
            rel_dir = Path(dirpath).relative_to(root)
            depth = len(rel_dir.parts)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and depth < MAX_DEPTH)
            visited += len(dirnames) + len(filenames)
            if visited > MAX_VISITED:
                return sorted(seen.values(), key=lambda e: e["name"]), True
            for fn in sorted(filenames):
                suffix = Path(fn).suffix.lower()
                if fn.startswith(".") or suffix not in MEDIA_SUFFIXES:
                    continue
                name = (rel_dir / fn).as_posix()
                if name in seen:
                    continue
                real = Path(os.path.realpath(Path(dirpath) / fn))
                if not inside(real) or not real.is_file():
                    continue
                if len(seen) >= MAX_LISTED:
                    return sorted(seen.values(), key=lambda e: e["name"]), True
                seen[name] = {"name": name, "kind": media_kind(suffix), "bytes": real.stat().st_size}
    return sorted(seen.values(), key=lambda e: e["name"]), False


def relevance_extra(result, paths: list[Path], spec: PreprocessSpec) -> dict:
    """{"relevance": ...} for a result asked with keep_arrays (kind "images" for several images; thumbnails
    un-normalised by the export's `spec`); frees the arrays afterwards."""
    rel = result.arrays["relevance"]
    kind = "images" if len(paths) > 1 else relevance_kind(paths[0], rel)
    extra = {"relevance": relevance_json(rel, result.arrays.get("pixel_values"), kind, spec)}
    result.arrays.clear()
    return extra


def page_routes(server, check_auth: Callable[[Request], None], check_ready: Callable[[], None], error_response) -> list:
    opts = server.opts

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    async def media(request: Request) -> Response:
        try:
            check_auth(request)
            check_ready()
        except ApiError as err:
            return error_response(err)
        entries, truncated = await asyncio.to_thread(list_media, server.policy.media_dirs, server.policy._inside)
        fmin, fmax = server.pipe.frame_range()
        return JSONResponse({
            "object": "list", "data": entries, "truncated": truncated, "model": server.model_id,
            "limits": {"frames": {"default": opts.frames, "min": fmin, "max": fmax}, "max_tokens": opts.max_tokens,
                       "max_upload_bytes": opts.max_upload_bytes},
        })

    return [
        Route("/", index, methods=["GET"]),
        Route("/v1/media", media, methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
