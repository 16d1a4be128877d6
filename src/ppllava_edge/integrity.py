"""Digests of an export's files in `export.json` (`weights`), checked in full by `ppllava-edge verify` and cheaply
at every load.

The exporter and `quantize` record, for every file export.json names (graphs, their external data, the embedding
table, the image-newline row, the tokenizers): its size, its SHA-256, and a sampled SHA-256 (size + first, middle
and last MiB; the whole file when small, runtime.cache.file_digest). Loading an export compares the size and the
sampled digest of each file before using it: a truncated, zeroed or replaced file is refused with one error naming
it, at the cost of reading ~3 MiB per file. A few flipped bytes in the middle of a 13 GB weight file escape that
sample; `verify` hashes every byte (seconds per GB) and catches them. Exports made before digests were recorded
still load (only ONNX Runtime's and numpy's own checks apply) and `verify` says so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError
from .manifest import ExportManifest, load_manifest


def file_digests(folder: str | os.PathLike, data: dict) -> dict[str, dict]:
    """export.json's `weights` entry for the files in `folder` that the manifest `data` being written names (reads
    every byte once)."""
    from .digest import file_digest, sha256_file

    files = ExportManifest(Path(folder), data).files()
    return {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p), "sampled_sha256": file_digest(p)} for p in files}


def quick_problem(path: Path, record: dict | None) -> str | None:
    """What is wrong with `path` by its size and sampled digest (cheap), or None (also when nothing is recorded)."""
    from .digest import file_digest

    if record is None:
        return None
    try:
        size = path.stat().st_size
    except OSError as exc:
        return exc.strerror or str(exc)
    if size != record["bytes"]:
        return f"{size} bytes, export.json records {record['bytes']}"
    if file_digest(path) != record["sampled_sha256"]:
        return "its content differs from the digest export.json records"
    return None


def damaged(path: Path, problem: str, error=ConfigError):
    """The error for a damaged export file (ConfigError; graph loads raise InferenceError like other load failures)."""
    return error(f"{path}: damaged ({problem}).\nHint: `ppllava-edge verify {path.parent}` checks every file; "
                 "export (or copy) the folder again.")


def check_files(manifest: ExportManifest, paths: list[Path], error=ConfigError) -> None:
    """Refuse the first of `paths` whose size or sampled digest differs from export.json's `weights`."""
    records = manifest.weights or {}
    for path in paths:
        problem = quick_problem(path, records.get(path.name))
        if problem is not None:
            raise damaged(path, problem, error)


@dataclass(frozen=True)
class FileCheck:
    name: str
    status: str  # ok | damaged | missing | unrecorded
    detail: str = ""


@dataclass(frozen=True)
class VerifyReport:
    folder: Path
    files: list[FileCheck]
    recorded: bool  # export.json has digests (exports made before they were recorded do not)

    @property
    def passed(self) -> bool:
        return all(f.status in ("ok", "unrecorded") for f in self.files)


def verify_export(folder: str | os.PathLike, progress=None) -> VerifyReport:
    """Hash every file of an export and compare with export.json (see the module docstring)."""
    from .digest import sha256_file

    manifest = load_manifest(folder)
    records = manifest.weights
    files = manifest.files()
    out = []
    for i, path in enumerate(files):
        record = (records or {}).get(path.name)
        if not path.is_file():
            out.append(FileCheck(path.name, "missing"))
        elif record is None:
            out.append(FileCheck(path.name, "unrecorded", f"{path.stat().st_size} bytes, no digest in export.json"))
        elif path.stat().st_size != record["bytes"]:
            out.append(FileCheck(path.name, "damaged", f"{path.stat().st_size} bytes, export.json records {record['bytes']}"))
        elif sha256_file(path) != record["sha256"]:
            out.append(FileCheck(path.name, "damaged", "sha256 differs from export.json"))
        else:
            out.append(FileCheck(path.name, "ok", f"{record['bytes']} bytes"))
        if progress is not None:
            progress(i + 1, len(files))
    return VerifyReport(manifest.folder, out, records is not None)
