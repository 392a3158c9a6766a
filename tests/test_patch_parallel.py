"""Exact patch-parallel encode and decode over torch.distributed (issue 12): gloo process groups on CPU, each
world size spawned once with every case run inside (tests/pp_worker.py), compared with one process; torchrun for
the command line.

The bound: one process running the same units gives the references; the bands differ from them only in the order
GroupNorm statistics are merged (per-band Chan partials) and in how the attention's reductions are split. We
calibrate with the difference the project already shows between emitted and separately computed statistics on
the kernels (EMIT_GN_STATS on vs off, under the interpreter here) and allow 4x that, floored at 2e-6 (fp32).
"""
import copy
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from tests import pp_worker
from tests.helpers import error_report


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world: int, tmp_path, interpret: bool, worker=pp_worker.worker) -> list[dict]:
    mp.spawn(worker, args=(world, _free_port(), str(tmp_path), interpret), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def single():
    """One process running the same units: the references and the calibrated fp32 bound."""
    from sdvae_fast import fast
    from sdvae_fast.kernels import _common

    vae = pp_worker.make_vae()
    z = pp_worker.latents()
    stages = fast.decoder_units(vae.decoder, vae.post_quant_conv)

    def run(stages, x, emit=False):
        return fast.run_stages(stages, x, fast.RunContext(emit_stats=emit)).contiguous()

    small_vae = pp_worker.make_vae(pp_worker.SMALL_CONFIG)
    small_stages = fast.decoder_units(small_vae.decoder, small_vae.post_quant_conv)
    small_z = pp_worker.latents(shape=pp_worker.SMALL_LATENT_SHAPE)
    with torch.no_grad():
        # The calibration, on the kernels (under the interpreter here) and the full-depth VAE: emitted vs
        # separately computed statistics. Then the two-level VAE's reference for the interpreter worlds.
        computed = run(stages, small_z)
        emitted = run(stages, small_z, emit=True)
        small = run(small_stages, small_z)
        kernels_on = _common.INTERPRET
        _common.INTERPRET = False  # the references on the ops' PyTorch code, as the ranks run it (minutes saved)
        try:
            plain = run(stages, z)
            moments = run(fast.encoder_units(vae.encoder, vae.quant_conv), pp_worker.images())
            vae16 = copy.deepcopy(vae).half()
            plain16 = run(fast.decoder_units(vae16.decoder, vae16.post_quant_conv), z.half()).float()
            overflow = run(stages, pp_worker.overflow_latents().float())
            small_moments = run(fast.encoder_units(small_vae.encoder, small_vae.quant_conv),
                                pp_worker.images(shape=pp_worker.SMALL_IMAGE_SHAPE))
        finally:
            _common.INTERPRET = kernels_on
        modules = vae.set_backend("torch") or vae.decode(z).sample
        torch_bf16 = copy.deepcopy(vae).to(torch.bfloat16).decode(z.to(torch.bfloat16)).sample.float()
    calibration = error_report(emitted, computed)["rel_l2"]
    bound = max(4 * calibration, 2e-6)
    print(f"calibration: emitted vs computed statistics rel_l2 {calibration:.2e}, bound {bound:.1e}")
    assert error_report(plain, modules)["rel_l2"] < 1e-5
    bf16_bound = 2 * error_report(torch_bf16, modules)["rel_l2"] + 1e-3  # 2x PyTorch's own bf16 error
    return dict(plain=plain, modules=modules, bound=bound, bf16_bound=bf16_bound, moments=moments, plain16=plain16,
                overflow=overflow, small=small, small_moments=small_moments)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_encode_and_decode_split_by_rows_equal_one_process_on_every_rank(world, single, tmp_path):
    plain, bound, moments = single["plain"], single["bound"], single["moments"]
    results = _spawn(world, tmp_path, interpret=False)
    fp16_bound = 2 * error_report(single["plain16"], plain)["rel_l2"] + 1e-4
    for rank, got in enumerate(results):
        report = error_report(got["full"], plain)
        print(f"world {world} rank {rank}: rel_l2 {report['rel_l2']:.2e} (bound {bound:.1e}), max_abs "
              f"{report['max_abs']:.2e}")
        assert got["full"].shape == plain.shape and report["rel_l2"] <= bound
        assert torch.equal(got["full"], results[0]["full"]), "ranks disagree"
        assert error_report(got["full_not_emitted"], plain)["rel_l2"] <= bound  # statistics computed, not emitted
        start, band = int(got["start"]), got["band"]
        assert torch.equal(band, got["full"][:, :, start:start + band.shape[2]])
        assert error_report(got["bf16"], single["modules"])["rel_l2"] <= single["bf16_bound"]
        assert error_report(got["fp16"], plain)["rel_l2"] <= fp16_bound
        # Only the last rank's band overflows fp16: all ranks recompute together (else the merged statistics
        # would carry its inf into every band).
        assert torch.isfinite(got["fp16_overflow"]).all()
        assert error_report(got["fp16_overflow"], single["overflow"])["rel_l2"] < 2e-3
        encoded = error_report(got["moments"], moments)
        assert got["moments"].shape == moments.shape and encoded["rel_l2"] <= bound, encoded
        assert torch.equal(got["api_decode"], got["full"]) and torch.equal(got["api_mean"], got["moments"][:, :4])
        assert torch.equal(got["api_sample"], results[0]["api_sample"]), "sample() differs across ranks"
        # A live diffusers VAE: patched by enable_patch_parallel, split the same way, unpatched by disable.
        assert error_report(got["live_decode"], plain)["rel_l2"] <= bound
        assert torch.equal(got["live_band"], got["live_decode"][:, :, int(got["live_offset"]):][:, :, :got[
            "live_band"].shape[2]])
        assert error_report(got["live_mean"], moments[:, :4])["rel_l2"] <= bound
        assert torch.equal(got["live_sample"], results[0]["live_sample"]), "diffusers sample() differs"
        assert got["live_unpatched"]
        errors = got["errors"]
        assert "same input" in errors["different_input"]
        # One rank with a bad input: every rank raises the same error naming it (none waits in a collective).
        assert errors["one_rank_wrong"] == results[0]["errors"]["one_rank_wrong"]
        assert f"rank {world - 1}: the input is torch.float64" in errors["one_rank_wrong"]
        assert "decoder.conv_out* (conv_act is GELU" in errors["fallback_unit"]
        for api in ("api", "live"):  # ours and a live diffusers VAE: validation agreed, tiling refused
            assert errors[f"{api}_wrong_channels"] == results[0]["errors"][f"{api}_wrong_channels"]
            assert f"rank {world - 1}: " in errors[f"{api}_wrong_channels"] and "rank 0" not in errors[
                f"{api}_wrong_channels"]
            assert "tiling and patch parallelism do not combine" in errors[f"{api}_tiling"]
        # One rank raising in the middle of a stage: the same error on every rank, no hang.
        assert errors["mid_stage"] == (f"PatchParallelError: patch parallel decode failed on rank {world - 1}: "
                                       f"RuntimeError: {pp_worker.INJECTED}")
    heights = [r["band"].shape[2] for r in results]
    assert sum(heights) == plain.shape[2] and max(heights) - min(heights) <= 8  # one latent row = 8 pixels


def test_row_bands_split_the_smallest_map_and_refuse_more_ranks_than_rows():
    from sdvae_fast.parallel import row_bands

    assert row_bands(5, 2) == [(0, 3), (3, 5)] and row_bands(5, 4) == [(0, 2), (2, 3), (3, 4), (4, 5)]
    assert row_bands(58, 1) == [(0, 58)]
    with pytest.raises(ValueError, match="world size 6 is larger than the 5 rows"):
        row_bands(5, 6)


@pytest.mark.parametrize("world", [2, 3])
def test_triton_kernels_under_the_interpreter_split_by_rows_equal_one_process(world, single, tmp_path):
    """Decode and encode with the Triton kernels (under the interpreter) on every rank: halos, emitted partials
    and the K/V gather through the kernels themselves."""
    for got in _spawn(world, tmp_path, interpret=True, worker=pp_worker.interpreter_worker):
        assert error_report(got["full"], single["small"])["rel_l2"] <= single["bound"]
        assert error_report(got["moments"], single["small_moments"])["rel_l2"] <= single["bound"]


def _torchrun(args, tmp_path) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 -m sdvae_fast ARGS` on CPU (gloo), the PyTorch ops on every rank."""
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "sdvae_fast", *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)


def test_torchrun_decode_and_reconstruct_split_by_rows_and_write_once_from_rank_0(tmp_path):
    from PIL import Image
    from safetensors.torch import save_file

    from sdvae_fast import cli

    folder = tmp_path / "vae"
    pp_worker.make_vae().save_pretrained(folder)
    save_file({"z": pp_worker.latents()[:1].contiguous()}, str(tmp_path / "z.safetensors"))  # (1, 4, 5, 3)
    photo = tmp_path / "photo.png"
    Image.fromarray((pp_worker.images()[0].permute(1, 2, 0).add(1).mul(127.5)).byte().numpy()).save(photo)
    assert cli.main(["decode", str(tmp_path / "z.safetensors"), "--vae", str(folder), "--out",
                     str(tmp_path / "one"), "-q", "--backend", "torch"]) == 0

    run = _torchrun(["decode", "z.safetensors", "--vae", folder, "--out", "two", "-q"], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("z.png") == 1, run.stdout  # rank 0 prints, the others do not
    assert run.stderr.count("split by rows over 2 processes (gloo, cpu)") == 1, run.stderr[-3000:]
    one, two = (np.asarray(Image.open(tmp_path / d / "z.png"), dtype=np.int16) for d in ("one", "two"))
    assert one.shape == two.shape == (40, 24, 3) and np.abs(one - two).max() <= 1  # uint8 rounding only

    run = _torchrun(["reconstruct", photo, "--vae", folder, "--out", "rec", "-q"], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("PSNR") == 1 and (tmp_path / "rec" / "photo.png").is_file(), run.stdout


def test_under_torchrun_commands_that_do_not_split_images_are_refused(monkeypatch, capsys):
    from sdvae_fast import cli

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["encode", "photo.png", "-o", "z.safetensors"]) == 2
    assert "under torchrun only decode and reconstruct do" in capsys.readouterr().err
