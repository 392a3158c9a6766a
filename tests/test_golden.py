"""The fast path's outputs are bitwise those recorded before the registry refactor (tests/golden.py); the cases with
emitted statistics were re-recorded after the one intended change of numbers (the unified Chan merge), whose size
against the outputs before it is bounded by the last test.

Every case of `tests.golden.cases()`: the reference modules and the kernels (interpreter) in fp32 and bf16, with and
without emitted GroupNorm statistics, encode and decode of a seeded narrow VAE at batch 2.
"""
import pytest
import torch
from safetensors import safe_open

from tests import golden
from tests.helpers import error_report


class _Recorder(dict):
    """The recorded outputs, each case run the first time one of its keys is read (so a run that selects some
    cases pays for those only)."""

    def __missing__(self, key: str):
        self.update(golden.record([key.split(".")[0]]))
        return dict.__getitem__(self, key)


@pytest.fixture(scope="module")
def recorded():
    return _Recorder()


# The cases with the separate statistics pass repeat the kernels of the emitted ones under the interpreter (about
# 70 s on 2 cores); they run with the slow tests (`pytest -m slow tests/test_golden.py`).
_SLOW_CASES = {"triton_fp32_pass", "triton_bf16_pass"}


def _stored():
    with safe_open(str(golden.GOLDEN_PATH), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_golden_file_matches_its_own_digests():
    tensors, digests = _stored()
    assert set(tensors) == set(digests)
    for name, t in tensors.items():
        assert golden.digest(t) == digests[name], name


@pytest.mark.parametrize("case", [pytest.param(c[0], marks=pytest.mark.slow) if c[0] in _SLOW_CASES else c[0]
                                  for c in golden.cases()])
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


# Unifying the Chan merge (kernels/_jit.py: the k-way merges of the conv's per-run columns and of the merge kernel's
# chunks became pairwise trees of `chan_merge`) changed the bits of the cases with emitted statistics only. The
# outputs of those cases from before it are in tests/data/golden_emit_before_chan_tree.safetensors (recorded from
# the commit before the refactor; every other case there was bitwise equal to today's). Measured on today's
# two-level golden VAE: fp32 rel_l2 6.0e-7 (images) / 3.5e-7 (moments), max_abs 6.0e-7; bf16 images bitwise,
# moments rel_l2 3.9e-3, max_abs 5.9e-3 (fp32-rounding differences of mean/rstd flip some bf16 roundings: one ulp).
# On the earlier four-level VAE: fp32 8.7e-7 / 3.3e-7, bf16 1.1e-3 / 5.4e-3. The same order as the difference
# between emitted statistics and the separate pass (fp32 8.5e-7 / 3.2e-7, bf16 2.4e-3 / 4.7e-3).
_CHAN_TREE_BOUND = {"fp32": dict(rel_l2=2e-6, max_abs=5e-6), "bf16": dict(rel_l2=1e-2, max_abs=1e-2)}


@pytest.mark.parametrize("dtype", list(golden.DTYPES))
def test_emitted_stats_outputs_stay_within_the_bound_of_those_before_the_chan_merge_change(recorded, dtype):
    path = golden.GOLDEN_PATH.parent / "golden_emit_before_chan_tree.safetensors"
    with safe_open(str(path), "pt") as f:
        before = {k: f.get_tensor(k) for k in f.keys()}
    bound = _CHAN_TREE_BOUND[dtype]
    for part in ("moments", "images"):
        key = f"triton_{dtype}_emit.{part}"
        got, want = recorded[key].float(), before[key].float()
        r = error_report(got, want)
        max_abs = (got - want).abs().max().item()
        assert r["rel_l2"] <= bound["rel_l2"] and max_abs <= bound["max_abs"], (key, r["rel_l2"], max_abs)
