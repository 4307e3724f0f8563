"""A Cloud Storage API server on this machine for the ``gs://`` tests: ``gcp-storage-emulator``
(the JSON API on 127.0.0.1) and the environment that sends every Cloud Storage client to it.

gcsfs and google-cloud-storage follow ``STORAGE_EMULATOR_HOST``, TensorStore (Orbax's
checkpoints) ``TENSORSTORE_GCS_HTTP_URL``. Credential look-ups are kept on the machine too:
the GCE metadata server is pointed at a closed port on 127.0.0.1 (google-auth and TensorStore
read ``GCE_METADATA_*``), no key file or gcloud configuration is visible, and gcsfs is told to
authenticate anonymously and not to ask the storage control API over gRPC about the bucket.

The emulator's media downloads lack the ``x-goog-generation`` header that Cloud Storage sends
(https://cloud.google.com/storage/docs/xml-api/reference-headers#xgooggeneration); TensorStore
reads an object's generation from it (Orbax's OCDBT manifests) and fails with "Malformed
StorageGeneration" without it, so the server is started with its download handler adding it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

# A port on loopback that nothing listens on: metadata requests fail at once, on this machine.
CLOSED_LOOPBACK = "127.0.0.1:9"

# The emulator's command line, its download handler wrapped before the server module builds its
# route table from it.
_SERVER = r"""
import sys
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

download = objects.download

def download_with_generation(request, response, storage, *args, **kwargs):
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        response["x-goog-generation"] = obj["generation"]
        response["x-goog-metageneration"] = obj["metageneration"]
    except NotFound:
        pass
    return download(request, response, storage, *args, **kwargs)

objects.download = download_with_generation
from gcp_storage_emulator.__main__ import main
main(sys.argv[1:])
"""


def environment(port: int, gcloud_config: Path) -> dict[str, str | None]:
    """The variables to set (None: to remove) for clients of an emulator on ``port``."""
    url = f"http://127.0.0.1:{port}"
    return {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GCE_METADATA_HOST": CLOSED_LOOPBACK,
        "GCE_METADATA_IP": CLOSED_LOOPBACK,
        "GCE_METADATA_ROOT": CLOSED_LOOPBACK,
        "NO_GCE_CHECK": "true",
        "FSSPEC_GCS_TOKEN": "anon",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "CLOUDSDK_CONFIG": str(gcloud_config),
        "GOOGLE_APPLICATION_CREDENTIALS": None,
        "GOOGLE_CLOUD_PROJECT": "emulated",
    }


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gcp-storage-emulator exited with {proc.returncode}: {log.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"gcp-storage-emulator did not listen on port {port} within {timeout} s")


def serve(bucket: str, port: int, workspace: Path) -> Iterator[str]:
    """Runs the emulator with ``bucket`` and this process's environment pointed at it (inherited
    by subprocesses); yields ``gs://bucket``; stops it and restores the environment after.
    ``workspace``: an empty folder for the emulator's log and an empty gcloud configuration."""
    (workspace / "gcloud").mkdir()
    log = workspace / "emulator.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", _SERVER, "start", "--host=127.0.0.1", f"--port={port}", "--in-memory",
                                 "--quiet", f"--default-bucket={bucket}"], stdout=out, stderr=subprocess.STDOUT)
    saved = {}
    try:
        _wait_for_port(port, proc, log)
        for name, value in environment(port, workspace / "gcloud").items():
            saved[name] = os.environ.get(name)
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        yield f"gs://{bucket}"
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
