"""Test-wide setup."""
import sys
import types

import pytest

# PyPI's torchvision 0.28 beside the CPU build of torch 2.13 fails on import while registering
# meta kernels for CUDA-only operators; those registrations are irrelevant on CPU, so an empty
# module stands in for them. Needed by pytorch-fid (Inception parity) and diffusers.
sys.modules.setdefault(
    "torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations")
)


@pytest.fixture(scope="session")
def gcs_bucket(tmp_path_factory):
    """``gs://<name>``: a bucket of a Cloud Storage API server on 127.0.0.1, with this process's
    environment (and its subprocesses') pointed at it and nowhere else (tests/gcs_emulator.py)."""
    import gcs_emulator  # pylint: disable=g-import-not-at-top
    import trainer_testlib  # pylint: disable=g-import-not-at-top

    yield from gcs_emulator.serve("tread-test", trainer_testlib.free_port(), tmp_path_factory.mktemp("gcs"))
