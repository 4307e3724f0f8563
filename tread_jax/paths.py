"""Workdir paths that may be local or on Cloud Storage (``gs://bucket/...``).

Files go through ``etils.epath`` (``gcsfs`` for ``gs://``), the library Orbax uses for its own
paths, so that every file a run writes can live in a bucket that all hosts of a pod share.
Two things differ from a local disk: a relative local path is made absolute (a URL is left
as it is), and a Cloud Storage object is written whole (there is no append and no atomic
rename, but an upload replaces an object atomically).
"""

from __future__ import annotations

import os
import shutil

import fsspec
import fsspec.config
from etils import epath

# gcsfs caches directory listings for the life of the process, but TensorStore (Orbax's array
# writes) and the other hosts of a pod change the bucket behind its back: a cached listing would
# hide their checkpoint steps. A value the user configured for fsspec is kept.
fsspec.config.conf.setdefault("gs", {}).setdefault("use_listings_cache", False)


def is_remote(path: str | os.PathLike) -> bool:
    """True for a URL such as ``gs://bucket/run``."""
    return "://" in os.fspath(path)


def absolute(path: str | os.PathLike) -> str:
    """A local path made absolute; a URL unchanged (``os.path.abspath`` would make it a folder "gs:")."""
    path = os.fspath(path)
    return path if is_remote(path) else os.path.abspath(path)


def bucket(path: str) -> str:
    """``gs://bucket/run`` -> ``gs://bucket``."""
    scheme, _, rest = path.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"


def write_bytes(path: str | os.PathLike, content: bytes) -> None:
    """Replaces ``path`` as a whole: locally through a temporary file renamed over it, so a crash
    leaves the old file or the new one; on Cloud Storage one upload (atomic by itself)."""
    target = epath.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_remote(path):
        target.write_bytes(content)
        return
    temporary = f"{os.fspath(path)}.tmp"
    with open(temporary, "wb") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def write_text(path: str | os.PathLike, text: str) -> None:
    """``write_bytes`` of UTF-8 text."""
    write_bytes(path, text.encode("utf-8"))


def upload_tree(local_directory: str, target: str) -> None:
    """Copies a local directory's files under ``target`` (a local path or a URL)."""
    filesystem, root = fsspec.core.url_to_fs(target)
    filesystem.put(f"{local_directory.rstrip('/')}/", root, recursive=True)


def move_tree(source: str, target: str) -> None:
    """Moves a directory (replacing ``target``). Cloud Storage has no rename: each object is
    copied, then the source is deleted."""
    target_path = epath.Path(target)
    if target_path.exists():
        target_path.rmtree()
    if not is_remote(source):
        target_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(source, target)
        return
    filesystem, source_root = fsspec.core.url_to_fs(source)
    filesystem.copy(source_root, fsspec.core.url_to_fs(target)[1], recursive=True)
    filesystem.rm(source_root, recursive=True)
