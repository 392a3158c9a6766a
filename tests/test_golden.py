"""The fast path's outputs are bitwise those recorded before the registry refactor (tests/golden.py).

Every case of `tests.golden.cases()`: the reference modules and the kernels (interpreter) in fp32 and bf16, with and
without emitted GroupNorm statistics, encode and decode of a seeded narrow VAE at batch 2.
"""
import pytest
import torch
from safetensors import safe_open

from tests import golden
from tests.helpers import error_report


@pytest.fixture(scope="module")
def recorded():
    return golden.record()


def _stored():
    with safe_open(str(golden.GOLDEN_PATH), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_golden_file_matches_its_own_digests():
    tensors, digests = _stored()
    assert set(tensors) == set(digests)
    for name, t in tensors.items():
        assert golden.digest(t) == digests[name], name


@pytest.mark.parametrize("case", [c[0] for c in golden.cases()])
def test_outputs_are_bitwise_the_recorded_ones(recorded, case):
    stored, _ = _stored()
    for part in ("moments", "images"):
        key = f"{case}.{part}"
        got, want = recorded[key], stored[key]
        assert got.dtype == want.dtype and got.shape == want.shape, key
        if not torch.equal(got, want):
            r = error_report(got, want)
            pytest.fail(f"{key} differs from the recorded output: rel_l2={r['rel_l2']:.3e} "
                        f"max_abs={r['max_abs']:.3e} worst_index={r['worst_index']}")
