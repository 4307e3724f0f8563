"""The local cache for downloaded weights and prepared datasets, and checksummed downloads."""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
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


def fetch_files(folder: str | os.PathLike, names: Sequence[str], url: str, sha256: Mapping[str, str | None],
                unavailable: Callable[[str], str]) -> Path:
    """Returns ``folder`` holding every file of ``names`` (paths relative to it), downloading what is missing.

    ``url`` is a template with ``{file}`` (tests point it at file:// URLs). Each file is checked
    against ``sha256[name]`` where a digest is given; otherwise against the digest recorded in
    ``<file>.sha256`` at first download (trust on first use). A corrupt or mismatching file raises
    ValueError and is never used. A file that cannot be had raises FileNotFoundError with
    ``unavailable(reason)``; with ``HF_HUB_OFFLINE`` set, without trying the network.
    """
    folder = Path(folder)
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    for name in names:
        target = folder / name
        record = target.with_name(f"{target.name}.sha256")
        if not target.is_file():
            if offline:
                raise FileNotFoundError(unavailable("HF_HUB_OFFLINE is set"))
            fetched = target.with_name(f"{target.name}.unverified")
            try:
                download(url.format(file=name), fetched)
            except (urllib.error.URLError, OSError) as e:
                raise FileNotFoundError(unavailable(f"downloading {name} failed: {e}")) from e
            digest = sha256_file(fetched)
            if sha256.get(name) and digest != sha256[name]:
                fetched.unlink()
                raise ValueError(f"downloaded {name} has sha256 {digest}, expected {sha256[name]}; "
                                 f"the file was discarded")
            fetched.replace(target)
            record.write_text(digest + "\n")
            continue
        expected = sha256.get(name) or (record.read_text().strip() if record.is_file() else None)
        if expected is not None and sha256_file(target) != expected:
            raise ValueError(f"{target} does not match its sha256 {expected}; delete it to download again")
    return folder
