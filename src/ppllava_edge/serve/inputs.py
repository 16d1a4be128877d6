"""Where a request's video comes from, under the server's security rules.

- `data:<mime>;base64,<payload>`: decoded into a private temporary folder (deleted after the answer). A payload
  over the upload limit is refused with 413 before it is decoded; bad base64 is a 400.
- `file:///path` or a plain path: allowed only when it resolves — symlinks followed — inside one of the
  `--media-dir` folders (a relative path is taken relative to each of them, in order). Anything else is a 403 and
  the file is never opened (only its path is resolved). Without `--media-dir` there is no path access at all.
- `http://`, `https://` and every other scheme: refused (400); the server never fetches anything.
"""

from __future__ import annotations

import base64
import binascii
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from .protocol import ApiError, MediaPart, bad

# MIME type -> file suffix (the runtime picks the video / image / .npy path by suffix; FFmpeg and Pillow sniff
# the content itself)
MIME_SUFFIX = {
    "video/mp4": ".mp4", "video/webm": ".webm", "video/x-matroska": ".mkv", "video/matroska": ".mkv",
    "video/quicktime": ".mov", "video/x-msvideo": ".avi", "video/avi": ".avi", "video/mpeg": ".mpg", "video/mp2t": ".ts",
    "video/ogg": ".ogv", "video/3gpp": ".3gp", "image/gif": ".gif",
    "image/png": ".png", "image/jpeg": ".jpg", "image/jpg": ".jpg", "image/webp": ".webp", "image/bmp": ".bmp",
    "image/tiff": ".tiff", "application/x-npy": ".npy", "application/npy": ".npy",
}


@dataclass(frozen=True)
class MediaFile:
    """A resolved media file: `path` is what the pipeline opens; `label` replaces a temporary path in messages."""

    path: Path
    label: str
    temporary: bool

    def cleanup(self) -> None:
        if self.temporary:
            self.path.unlink(missing_ok=True)


class MediaPolicy:
    def __init__(self, media_dirs: list[Path], max_upload_bytes: int, upload_dir: Path):
        self.media_dirs = [Path(os.path.realpath(d)) for d in media_dirs]
        self.max_upload_bytes = max_upload_bytes
        self.upload_dir = upload_dir

    def resolve(self, part: MediaPart) -> MediaFile:
        url = part.url
        if url.startswith("data:"):
            return self._data_url(part)
        scheme = urlsplit(url).scheme.lower() if "://" in url or url[:5].lower() in ("http:", "file:") else ""
        if scheme == "file":
            u = urlsplit(url)
            if u.netloc not in ("", "localhost"):
                raise bad(part.param, f"'{part.param}': file:// URLs must name a local path (file:///...), got host {u.netloc!r}", "unsupported_url")
            return self._path(unquote(u.path), part)
        if scheme:
            raise bad(
                part.param,
                f"'{part.param}': {scheme}:// URLs are not fetched by this server. Send the media inline as a base64 "
                "data: URL, or as a file:// path under one of the server's --media-dir folders.",
                "unsupported_url",
            )
        return self._path(url, part)

    # ---- paths -----------------------------------------------------------------------------------------------
    def _inside(self, real: Path) -> bool:
        return any(real == d or d in real.parents for d in self.media_dirs)

    def _path(self, raw: str, part: MediaPart) -> MediaFile:
        if not self.media_dirs:
            raise ApiError(403, f"'{part.param}': file paths are disabled on this server (it was started without --media-dir); "
                                "send the media as a base64 data: URL", part.param, "path_access_disabled")
        if "\x00" in raw:
            raise bad(part.param, f"'{part.param}': the path contains a NUL byte", "invalid_path")
        candidates = [Path(raw)] if os.path.isabs(raw) else [d / raw for d in self.media_dirs]
        allowed = []
        for c in candidates:
            real = Path(os.path.realpath(c))  # follows every symlink; does not open the file
            if self._inside(real):
                allowed.append(real)
        if not allowed:
            raise ApiError(403, f"'{part.param}': {raw!r} is outside the server's media folders (symlinks are followed)", part.param, "path_not_allowed")
        for real in allowed:
            if real.is_file():
                return MediaFile(real, raw, temporary=False)
        raise bad(part.param, f"'{part.param}': no such file {raw!r} in the server's media folders", "file_not_found")

    # ---- uploads ---------------------------------------------------------------------------------------------
    def _data_url(self, part: MediaPart) -> MediaFile:
        header, sep, payload = part.url.partition(",")
        if not sep:
            raise bad(part.param, f"'{part.param}': a data: URL needs a ',' before its payload", "invalid_data_url")
        fields = header[5:].split(";")
        mime = fields[0].strip().lower()
        if "base64" not in [f.strip().lower() for f in fields[1:]]:
            raise bad(part.param, f"'{part.param}': only base64 data: URLs are accepted (data:<mime>;base64,...)", "invalid_data_url")
        suffix = MIME_SUFFIX.get(mime)
        if suffix is None:
            if mime.startswith("video/") or (mime in ("", "application/octet-stream") and part.kind == "video_url"):
                suffix = ".mp4"  # FFmpeg finds the real container from the content
            elif mime.startswith("image/") or (mime in ("", "application/octet-stream") and part.kind == "image_url"):
                suffix = ".png"  # Pillow finds the real format from the content
            else:
                raise bad(part.param, f"'{part.param}': unsupported media type {mime!r} (send a video/*, image/* or application/x-npy payload)", "unsupported_media_type")
        payload = payload.translate({ord(c): None for c in " \t\r\n"})
        size = len(payload) * 3 // 4 - payload[-2:].count("=")
        if size > self.max_upload_bytes:
            raise ApiError(413, f"'{part.param}': the upload is {size / 2**20:.1f} MiB, over this server's limit of "
                                f"{self.max_upload_bytes / 2**20:g} MiB (--max-upload-mb)", part.param, "upload_too_large")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise bad(part.param, f"'{part.param}': the data: URL payload is not valid base64 ({exc})", "invalid_base64") from None
        if not data:
            raise bad(part.param, f"'{part.param}': the data: URL payload is empty", "invalid_data_url")
        path = self.upload_dir / f"upload-{uuid.uuid4().hex}{suffix}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        kind = "video" if part.kind == "video_url" else "image"
        return MediaFile(path, f"the uploaded {kind} ({part.param})", temporary=True)
