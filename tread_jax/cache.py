"""The local cache for downloaded weights and prepared datasets, and checksummed downloads."""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.request
from pathlib import Path


def cache_root() -> Path:
    """``$TREAD_JAX_CACHE``, else ``~/.cache/tread_jax``."""
    return Path(os.environ.get("TREAD_JAX_CACHE") or "~/.cache/tread_jax").expanduser()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, dest: str | os.PathLike) -> None:
    """Streams ``url`` (any scheme urllib opens: https, file) into ``dest``.

    Writes ``dest.partial`` first and renames it, so an interrupted download never leaves a
    file that looks complete. Raises ``urllib.error.URLError`` or ``OSError`` on failure.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, partial.open("wb") as out:
            shutil.copyfileobj(response, out, length=1 << 20)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(dest)
