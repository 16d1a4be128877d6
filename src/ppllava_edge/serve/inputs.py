"""Where a request's video or images come from, under the server's security rules (each media part alike).

- `data:<mime>;base64,<payload>` (the scheme in any case): decoded piecewise straight into a private temporary folder
  (deleted after the answer; a failed write leaves nothing behind and answers 507). A payload over the upload limit
  is refused with 413 before it is decoded; bad base64 is a 400.
- `file:///path` or a plain path: allowed only when it resolves — symlinks followed — inside one of the
  `--media-dir` folders (a relative path is taken relative to each of them, in order). Anything else is a 403 and
  the file is never opened (only its path is resolved). Without `--media-dir` there is no path access at all.
- `http://`, `https://` and every other scheme: refused (400); the server never fetches anything.
"""

from __future__ import annotations

import base64
import binascii
import errno
import os
import re
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
        if url[:5].lower() == "data:":
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

    def resolve_all(self, parts: list[MediaPart]) -> list[MediaFile]:
        """`resolve` for each part of a request, in order; when one fails, the uploads already written for the
        request are removed before the error leaves (nothing of a refused request stays on disk)."""
        files: list[MediaFile] = []
        try:
            for part in parts:
                files.append(self.resolve(part))
        except BaseException:
            for f in files:
                f.cleanup()
            raise
        return files

    # ---- paths -----------------------------------------------------------------------------------------------
    def _inside(self, real: Path) -> bool:
        return any(real == d or d in real.parents for d in self.media_dirs)

    def _path(self, raw: str, part: MediaPart) -> MediaFile:
        if not self.media_dirs:
            raise ApiError(403, f"'{part.param}': file paths are disabled on this server (it was started without --media-dir); "
                                "send the media as a base64 data: URL", part.param, "path_access_disabled")
        if "\x00" in raw:
            raise bad(part.param, f"'{part.param}': the path contains a NUL byte", "invalid_path")
        try:
            return self._resolve_path(raw, part)
        except OSError as exc:  # e.g. a name longer than the filesystem allows
            raise bad(part.param, f"'{part.param}': cannot use the path ({exc.strerror or exc})", "invalid_path") from None

    def _resolve_path(self, raw: str, part: MediaPart) -> MediaFile:
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
    def upload_names(self) -> re.Pattern:
        """Matches this policy's temporary upload paths (and bare names) in messages and cached warnings."""
        return re.compile(re.escape(str(self.upload_dir)) + r"/upload-[0-9a-f]{32}\.\w+|upload-[0-9a-f]{32}\.\w+")

    def _data_url(self, part: MediaPart) -> MediaFile:
        url = part.url
        comma = url.find(",")
        if comma < 0:
            raise bad(part.param, f"'{part.param}': a data: URL needs a ',' before its payload", "invalid_data_url")
        fields = url[5:comma].split(";")
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
        start = comma + 1
        spaces = sum(url.count(c, start) for c in _SPACES)  # counted in place: the payload is never copied whole
        chars = len(url) - start - spaces
        size = chars * 3 // 4 - (url[-2:].count("=") if not spaces else 0)
        if size > self.max_upload_bytes:
            raise ApiError(413, f"'{part.param}': the upload is {size / 2**20:.1f} MiB, over this server's limit of "
                                f"{self.max_upload_bytes / 2**20:g} MiB (--max-upload-mb)", part.param, "upload_too_large")
        if chars == 0:
            raise bad(part.param, f"'{part.param}': the data: URL payload is empty", "invalid_data_url")
        path = self.upload_dir / f"upload-{uuid.uuid4().hex}{suffix}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                _decode_base64_into(url, start, bool(spaces), f, part)
        except BaseException as exc:
            path.unlink(missing_ok=True)  # never leave a partial upload behind
            if isinstance(exc, OSError):
                full = exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
                raise ApiError(
                    507 if full else 503,
                    f"'{part.param}': the server cannot store the upload right now ({exc.strerror or exc}); retry later or send a smaller file",
                    part.param, "insufficient_storage" if full else "upload_failed",
                ) from None
            raise
        kind = "video" if part.kind == "video_url" else "image"
        return MediaFile(path, f"the uploaded {kind} ({part.param})", temporary=True)


_SPACES = " \t\r\n"
_NO_SPACES = {ord(c): None for c in _SPACES}
_B64_PIECE = 1 << 22  # base64 characters decoded at a time (a multiple of 4): 3 MiB of output


def _decode_base64_into(url: str, start: int, has_spaces: bool, out, part: MediaPart) -> None:
    """Decode url[start:] (base64, whitespace ignored) into the file `out`, one piece at a time."""
    carry = ""
    for pos in range(start, len(url), _B64_PIECE):
        piece = url[pos:pos + _B64_PIECE]
        if has_spaces:
            piece = piece.translate(_NO_SPACES)
        piece = carry + piece
        whole = len(piece) - len(piece) % 4
        carry = piece[whole:]
        _write_base64(piece[:whole], out, part)
    if carry:
        _write_base64(carry, out, part)


def _write_base64(chunk: str, out, part: MediaPart) -> None:
    try:
        out.write(base64.b64decode(chunk, validate=True))
    except (binascii.Error, ValueError) as exc:
        raise bad(part.param, f"'{part.param}': the data: URL payload is not valid base64 ({exc})", "invalid_base64") from None
