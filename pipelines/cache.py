"""The on-disk stage cache: input hashes, ``meta.json``, atomic writes and the work-folder lock.

A stage's results live in ``WORK/<stage>/``. That folder only ever appears complete: a stage writes
into ``WORK/.tmp-<stage>-<pid>/``, writes ``meta.json`` last, then renames the folder into place.
A run killed at any point leaves at most a ``.tmp-*`` folder, which is never trusted and is removed
by the next run.

Input files are hashed by content (SHA-256 of the whole file) when they are at most
``SAMPLE_THRESHOLD`` bytes; larger files by their size, mtime and the SHA-256 of their first and
last MiB. The stage key combines the cache layout version (``lmvic.CACHE_VERSION``), the stage's config (its dataclass as
JSON), the input digests and the key of the stage before it, so a change anywhere re-runs that
stage and every stage after it.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from lmvic import CACHE_VERSION
from pipelines.errors import LmvicError

SAMPLE_THRESHOLD = 64 << 20
_MIB = 1 << 20


# ---------------------------------------------------------------- atomic writes
def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would leave results unreadable to other users
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise LmvicError(f"cannot read {path}: {exc}") from exc


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    import io

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array))
    atomic_write_bytes(path, buf.getvalue())


# ---------------------------------------------------------------- hashing
def file_digest(path: Path) -> str:
    """Content digest of one file (sampled above SAMPLE_THRESHOLD bytes, see the module doc)."""
    path = Path(path)
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if st.st_size <= SAMPLE_THRESHOLD:
            for block in iter(lambda: f.read(_MIB), b""):
                h.update(block)
        else:
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
            h.update(f.read(_MIB))
            f.seek(-_MIB, os.SEEK_END)
            h.update(f.read(_MIB))
    return h.hexdigest()


def files_digest(files: list[Path], root: Path) -> str:
    """One digest for a set of files, keyed by their paths relative to ``root``."""
    h = hashlib.sha256()
    for path in sorted(files):
        h.update(str(Path(path).relative_to(root)).encode())
        h.update(file_digest(path).encode())
    return h.hexdigest()


def config_digest(config: Any) -> str:
    """Digest of a config dataclass (its fields as sorted JSON), leaving out fields that cannot
    change a result (``field(metadata={"cache": False})``, e.g. a thread count). A field marked
    ``metadata={"file_content": True}`` whose value names an existing file contributes that file's
    content, so editing the file invalidates the stage (e.g. a coding-order file)."""
    values = {}
    for f in dataclasses.fields(config):
        if not f.metadata.get("cache", True):
            continue
        value = getattr(config, f.name)
        if f.metadata.get("file_content") and Path(str(value)).is_file():
            value = {"file": str(value), "sha256": file_digest(Path(str(value)))}
        values[f.name] = value
    payload = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class StageKey:
    """Everything that decides whether a stage's cached result is still valid."""

    format_version: int
    config: str
    inputs: str
    upstream: str

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()

    @classmethod
    def make(cls, config: Any, inputs: str, upstream: str) -> "StageKey":
        return cls(CACHE_VERSION, config_digest(config), inputs, upstream)

    def why_stale(self, meta: dict) -> str | None:
        """None if ``meta`` (a stage's meta.json) was written under this key, else the reason."""
        old = meta.get("key", {})
        if old.get("format_version") != self.format_version:
            return f"written by format version {old.get('format_version')}, this lmvic uses {self.format_version}"
        if old.get("inputs") != self.inputs:
            return "its input files changed"
        if old.get("upstream") != self.upstream:
            return "an earlier stage changed"
        if old.get("config") != self.config:
            return "its options changed"
        return None


# ---------------------------------------------------------------- stage folders
def read_meta(stage_dir: Path) -> dict | None:
    """The stage's meta.json, or None when the folder is absent or was never completed."""
    meta = Path(stage_dir) / "meta.json"
    if not meta.is_file():
        return None
    try:
        return json.loads(meta.read_text())
    except ValueError:
        return None


@contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """A temporary folder beside ``final`` that replaces it only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.parent / f".old-{final.name}-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def clean_interrupted(work_dir: Path) -> list[Path]:
    """Remove what killed runs left behind (``.tmp-*``/``.old-*`` folders); returns what it removed."""
    removed = []
    if Path(work_dir).is_dir():
        for p in Path(work_dir).iterdir():
            if p.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p)
    return removed


@contextmanager
def work_lock(work_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the work folder; another lmvic process gets a clear error.

    The lock is an ``flock`` on ``WORK/.lock``: the kernel releases it when the holder dies, so a
    killed run never leaves a stale lock.
    """
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(work_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            raise LmvicError(f"{work_dir} is locked by a running lmvic (pid {holder}); wait for it to finish") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)
