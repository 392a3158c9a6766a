"""Exact patch-parallel encode and decode over torch.distributed (issue 12): gloo process groups on CPU, each
world size spawned once with every case run inside (tests/pp_worker.py), compared with one process.

The bound: one process running the same units gives the reference `single`; the bands differ from it only in the
order GroupNorm statistics are merged (per-band Chan partials instead of whole-tensor sums) and in which rows the
attention's reductions see at once. We calibrate with the difference the project already shows between emitted
and separately computed statistics (EMIT_GN_STATS on vs off) and allow 4x that, floored at 2e-6 (fp32).
"""
import socket

import pytest
import torch
import torch.multiprocessing as mp

from tests import pp_worker
from tests.helpers import error_report


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world: int, tmp_path, interpret: bool) -> list[dict]:
    mp.spawn(pp_worker.worker, args=(world, _free_port(), str(tmp_path), interpret), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def single():
    """(walker output without patch parallelism with emitted statistics off, the calibrated fp32 bound)."""
    from sdvae_fast import fast

    vae = pp_worker.make_vae()
    z = pp_worker.latents()
    stages = fast.decoder_units(vae.decoder, vae.post_quant_conv)
    with torch.no_grad():
        plain = fast.run_stages(stages, z, fast.RunContext(emit_stats=False)).contiguous()
        emitted = fast.run_stages(stages, z, fast.RunContext(emit_stats=True)).contiguous()
        moments = fast.run_stages(fast.encoder_units(vae.encoder, vae.quant_conv), pp_worker.images(),
                                  fast.RunContext(emit_stats=False)).contiguous()
        modules = vae.set_backend("torch") or vae.decode(z).sample
    bound = max(4 * error_report(emitted, plain)["rel_l2"], 2e-6)
    assert error_report(plain, modules)["rel_l2"] < 1e-5
    return plain, modules, bound, moments


@pytest.mark.parametrize("world", [2, 3, 4])
def test_encode_and_decode_split_by_rows_equal_one_process_on_every_rank(world, single, tmp_path):
    plain, modules, bound, moments = single
    results = _spawn(world, tmp_path, interpret=False)
    for rank, got in enumerate(results):
        report = error_report(got["full"], plain)
        print(f"world {world} rank {rank}: rel_l2 {report['rel_l2']:.2e} (bound {bound:.1e}), max_abs "
              f"{report['max_abs']:.2e}")
        assert got["full"].shape == plain.shape and report["rel_l2"] <= bound
        assert torch.equal(got["full"], results[0]["full"]), "ranks disagree"
        start, band = int(got["start"]), got["band"]
        assert torch.equal(band, got["full"][:, :, start:start + band.shape[2]])
        assert error_report(got["bf16"], modules)["rel_l2"] < 2e-2
        encoded = error_report(got["moments"], moments)
        assert got["moments"].shape == moments.shape and encoded["rel_l2"] <= bound, encoded
        assert torch.equal(got["api_decode"], got["full"]) and torch.equal(got["api_mean"], got["moments"][:, :4])
        assert torch.equal(got["api_sample"], results[0]["api_sample"]), "sample() differs across ranks"
        assert "same input" in got["errors"]["different_input"]
        assert "float16" in got["errors"]["fp16"]
        # One rank with a bad input: every rank raises the same error naming it (none waits in a collective).
        assert got["errors"]["one_rank_wrong"] == results[0]["errors"]["one_rank_wrong"]
        assert f"rank {world - 1}: the input is torch.float64" in got["errors"]["one_rank_wrong"]
    heights = [r["band"].shape[2] for r in results]
    assert sum(heights) == plain.shape[2] and max(heights) - min(heights) <= 8  # one latent row = 8 pixels


def test_row_bands_split_the_smallest_map_and_refuse_more_ranks_than_rows():
    from sdvae_fast.parallel import row_bands

    assert row_bands(5, 2) == [(0, 3), (3, 5)] and row_bands(5, 4) == [(0, 2), (2, 3), (3, 4), (4, 5)]
    assert row_bands(58, 1) == [(0, 58)]
    with pytest.raises(ValueError, match="world size 6 is larger than the 5 rows"):
        row_bands(5, 6)


@pytest.mark.slow
def test_triton_interpreter_bands_equal_one_process(single, tmp_path):
    """The same cases with the Triton kernels under the interpreter in every rank (about 2.5 minutes for 2 ranks
    on 2 cores, so marked slow: `pytest -m slow tests/test_patch_parallel.py`)."""
    plain, _, bound, moments = single
    for got in _spawn(2, tmp_path, interpret=True):
        assert error_report(got["full"], plain)["rel_l2"] <= bound
        assert error_report(got["moments"], moments)["rel_l2"] <= bound
