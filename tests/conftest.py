"""Test session setup: the Triton interpreter is switched on before anything defines a kernel.

Triton reads TRITON_INTERPRET when kernels are decorated, so it must be set before `sdvae_fast` is imported.
Tests that need the non-interpreter CPU behaviour run in a subprocess with the variable unset.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run by bench/gpu_check.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
