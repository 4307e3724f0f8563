"""Test-wide setup."""
import sys
import types

# PyPI's torchvision 0.28 beside the CPU build of torch 2.13 fails on import while registering
# meta kernels for CUDA-only operators; those registrations are irrelevant on CPU, so an empty
# module stands in for them. Needed by pytorch-fid (Inception parity) and diffusers.
sys.modules.setdefault(
    "torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations")
)
