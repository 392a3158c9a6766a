"""The `sdvae-fast` command line, the parity/profile/bench tools on CPU, and bench/gpu_check.sh's CPU-side parts.

Models are narrow but keep the SD structure (four levels, f = 8, mid attention) so that padding to multiples of
8 is exercised; the parity runs use a two-level model at 8x8 pixels because the Triton interpreter is slow.
Commands run in-process through `main(argv)` (conftest has switched the interpreter on), except where the
process boundary itself is under test (the entry point, one-line errors, the shell script).
"""
import argparse
import datetime
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from sdvae_fast import AutoencoderKL
from sdvae_fast import bench as bench_mod
from sdvae_fast import cli
from sdvae_fast.configs import PRESETS
from sdvae_fast.images import image_metrics, load_image, pad_to_multiple, to_uint8
from sdvae_fast.latents_io import LATENTS_FORMAT

REPO = Path(__file__).resolve().parent.parent
NARROW = dict(block_out_channels=(8, 16, 16, 16), norm_num_groups=4, layers_per_block=1)
TWO_LEVEL = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, layers_per_block=1)


@pytest.fixture(scope="module")
def narrow_dir(tmp_path_factory):
    """A narrow four-level VAE with a shift_factor (as SD3/FLUX have), saved in diffusers' layout."""
    folder = tmp_path_factory.mktemp("narrow") / "vae"
    vae = AutoencoderKL.from_preset("sd15", seed=1, scaling_factor=0.5, shift_factor=0.1, **NARROW)
    vae.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def two_level_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("two") / "vae"
    AutoencoderKL.from_preset("sd15", seed=2, **TWO_LEVEL).save_pretrained(folder)
    return folder


# Two levels of width 32 and 32 GroupNorm groups: single files load with the loader's default norm_num_groups.
SMALL_32 = dict(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1)


@pytest.fixture(scope="module")
def single_files(tmp_path_factory):
    """VAE-only single files: 16 latent channels (FLUX.1 or SD3?), 4 latent channels (SD 1.x or SDXL?), and the
    latter as a pickle that also holds a non-tensor object (refused without --unsafe-pickle)."""
    folder = tmp_path_factory.mktemp("single")
    files = {}
    for name, preset in (("flux_like", "flux1"), ("sd_like", "sd15")):
        state = AutoencoderKL.from_preset(preset, seed=3, **SMALL_32).state_dict()
        files[name] = folder / f"{name}.safetensors"
        # The group count is stated (as our writers store it), so only the family is left to guess.
        save_file({k: v.contiguous() for k, v in state.items()}, str(files[name]),
                  metadata={"norm_num_groups": "32"})
    files["pickle"] = folder / "sd_like.ckpt"
    torch.save({"state_dict": state, "hparams": Namespace(lr=1e-4)}, files["pickle"])
    tiny = folder / "tiny.png"
    Image.fromarray(np.full((1, 1, 3), 180, np.uint8)).save(tiny)
    files["one_pixel_png"] = tiny
    return files


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Crops of scikit-image's chelsea photo: 64x96 (multiples of 8) and 67x99 (not)."""
    import skimage.data

    folder = tmp_path_factory.mktemp("photos")
    cat = skimage.data.chelsea()  # (300, 451, 3) uint8
    paths = []
    for h, w in ((64, 96), (67, 99)):
        path = folder / f"chelsea_{w}x{h}.png"
        Image.fromarray(cat[60:60 + h, 120:120 + w]).save(path)
        paths.append(path)
    return paths


def _run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = [line for line in err.strip().splitlines() if not line.startswith("sdvae-fast: warning")]
    assert len(lines) == 1 and "error:" in lines[0], err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ---------------------------------------------------------------------------------------------------------------
# reconstruct / encode / decode / info
# ---------------------------------------------------------------------------------------------------------------


def test_reconstruct_writes_pngs_of_the_input_size_with_psnr_ssim_and_ms(narrow_dir, photos, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, _ = _run(["reconstruct", *photos, "--vae", narrow_dir, "--out", out, "-q"], capsys)
    assert code == 0
    for src in photos:
        assert Image.open(out / f"{src.stem}.png").size == Image.open(src).size
    # The printed PSNR/SSIM are those of the written PNG against the input (8-bit images, skimage.metrics).
    line = next(l for l in stdout.splitlines() if "chelsea_99x67.png" in l)
    psnr, ssim, ms = map(float, re.search(r"PSNR ([\d.]+) dB\s+SSIM ([\d.]+)\s+([\d.]+) ms", line).groups())
    ref = np.asarray(Image.open(photos[1]).convert("RGB"))
    got = np.asarray(Image.open(out / "chelsea_99x67.png"))
    expected_psnr, expected_ssim = image_metrics(ref, got)
    assert psnr == pytest.approx(expected_psnr, abs=0.006) and ssim == pytest.approx(expected_ssim, abs=6e-5)
    assert ms > 0 and "median" in stdout


def test_reconstruct_of_a_non_multiple_of_8_image_equals_pad_encode_decode_crop(narrow_dir, photos, tmp_path,
                                                                                 capsys):
    code, _, _ = _run(["reconstruct", photos[1], "--vae", narrow_dir, "--out", tmp_path, "-q"], capsys)
    assert code == 0
    vae = AutoencoderKL.from_pretrained(narrow_dir)
    vae.set_backend("torch")
    x = load_image(photos[1])  # (1, 3, 67, 99)
    padded, (h, w) = pad_to_multiple(x, 8)  # (1, 3, 72, 104), edges repeated
    assert padded.shape[-2:] == (72, 104)
    with torch.no_grad():
        y = vae.decode(vae.encode(padded).latent_dist.mode()).sample[..., :h, :w]
    assert np.array_equal(np.asarray(Image.open(tmp_path / f"{photos[1].stem}.png")), to_uint8(y)[0])


def test_reconstruct_help_says_what_happens_to_odd_sizes(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["reconstruct", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "not multiples of 8 are padded" in text and "cropped back" in text and "skimage:chelsea" in text


def test_encode_then_decode_through_a_latents_file_equals_model_decode(narrow_dir, photos, tmp_path, capsys):
    latents_path = tmp_path / "latents.safetensors"
    code, stdout, _ = _run(["encode", photos[1], "skimage:chelsea", "--vae", narrow_dir, "-o", latents_path, "-q"],
                           capsys)
    assert code == 0 and "latents (1, 4, 9, 13)" in stdout
    vae = AutoencoderKL.from_pretrained(narrow_dir)
    vae.set_backend("torch")
    stored = load_file(latents_path)
    from safetensors import safe_open

    with safe_open(str(latents_path), "pt") as f:
        meta = f.metadata()
    assert float(meta["scaling_factor"]) == 0.5 and float(meta["shift_factor"]) == 0.1
    assert json.loads(meta["config"])["block_out_channels"] == [8, 16, 16, 16]
    sizes = {e["key"]: (e["height"], e["width"]) for e in json.loads(meta["images"])}
    assert sizes == {photos[1].stem: (67, 99), "chelsea": (300, 451)}

    with torch.no_grad():
        padded, _ = pad_to_multiple(load_image(photos[1]), 8)
        mean = vae.encode(padded).latent_dist.mean  # (1, 4, 9, 13) unscaled
        # Scaled as pipelines expect: (z - shift_factor) * scaling_factor.
        torch.testing.assert_close(stored[photos[1].stem], (mean - 0.1) * 0.5, rtol=0, atol=0)
        expected = vae.decode(stored[photos[1].stem] / 0.5 + 0.1).sample[..., :67, :99]

    code, _, _ = _run(["decode", latents_path, "--vae", narrow_dir, "--out", tmp_path / "dec", "-q"], capsys)
    assert code == 0
    decoded = np.asarray(Image.open(tmp_path / "dec" / f"{photos[1].stem}.png"))
    assert decoded.shape == (67, 99, 3)
    assert np.array_equal(decoded, to_uint8(expected)[0])
    assert Image.open(tmp_path / "dec" / "chelsea.png").size == (451, 300)


def test_decode_of_latents_with_the_wrong_channel_count_is_a_one_line_error(narrow_dir, tmp_path, capsys):
    path = tmp_path / "bad.safetensors"
    save_file({"x": torch.randn(1, 3, 4, 4) + 0.5}, str(path))
    code, _, err = _run(["decode", path, "--vae", narrow_dir, "--out", tmp_path, "-q"], capsys)
    _assert_one_line_error(code, err, "(1, 3, 4, 4)", "(N, 4, h, w)")


def test_decode_of_a_batched_file_without_metadata_writes_one_png_per_image(narrow_dir, tmp_path, capsys):
    path = tmp_path / "batch.safetensors"
    save_file({"z": torch.randn(2, 4, 3, 5) + 0.3}, str(path))
    code, _, _ = _run(["decode", path, "--vae", narrow_dir, "--out", tmp_path / "dec", "-q"], capsys)
    assert code == 0
    assert [Image.open(tmp_path / "dec" / f"z_{i}.png").size for i in range(2)] == [(40, 24)] * 2


def test_info_reports_layout_family_config_parameters_and_dtype(narrow_dir, capsys):
    vae = AutoencoderKL.from_pretrained(narrow_dir)
    count = sum(p.numel() for p in vae.parameters())
    for target in (narrow_dir, narrow_dir / "diffusion_pytorch_model.safetensors"):
        code, stdout, _ = _run(["info", target], capsys)
        assert code == 0
        assert "layout: diffusers" in stdout and "family:" in stdout and "dtypes: float32" in stdout
        assert f"parameter count: {count:,}" in stdout and "block_out_channels: [8, 16, 16, 16]" in stdout
    code, stdout, _ = _run(["info", narrow_dir, "--json"], capsys)
    assert json.loads(stdout)["parameter_count"] == count


def test_user_errors_are_one_line_with_exit_code_2(narrow_dir, tmp_path, capsys):
    code, _, err = _run(["reconstruct", tmp_path / "missing.png", "--vae", narrow_dir, "--out", tmp_path], capsys)
    _assert_one_line_error(code, err, "missing.png")
    code, _, err = _run(["info", tmp_path / "nothing.safetensors"], capsys)
    _assert_one_line_error(code, err, "nothing.safetensors")
    code, _, err = _run(["encode", "skimage:chelsea", "--vae", tmp_path / "no_vae", "-o", tmp_path / "z"], capsys)
    _assert_one_line_error(code, err, "--vae")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\": 1")
    code, _, err = _run(["decode", corrupt, "--vae", narrow_dir, "--out", tmp_path], capsys)
    _assert_one_line_error(code, err, "corrupt.safetensors")


def test_without_vae_the_fallback_says_the_output_is_not_meaningful(monkeypatch, capsys):
    """When the shipped VAE is absent the CLI falls back to seeded preset weights and says so on stderr."""
    narrow = AutoencoderKL.from_preset("sd15", seed=0, **NARROW)
    monkeypatch.setattr(cli, "DEFAULT_VAE", "/nonexistent/tiny")
    monkeypatch.setattr(AutoencoderKL, "from_preset", classmethod(lambda cls, name, seed=0: narrow))
    args = Namespace(vae=None, preset=None, seed=0, device="cpu", dtype=None, backend="torch", scaling_factor=None,
                     shift_factor=None, unsafe_pickle=False)
    vae = cli.load_vae(args)
    assert vae is narrow and vae.backend == "torch"
    err = capsys.readouterr().err
    assert "not a meaningful image" in err and "--vae PATH" in err


def test_kernels_on_cpu_switch_the_interpreter_on_before_kernels_are_defined(monkeypatch):
    """Nothing kernel-related imported yet: setting TRITON_INTERPRET in this process is enough."""
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.delitem(sys.modules, "sdvae_fast.kernels._common", raising=False)
    assert cli._switch_on_interpreter(["parity"]) is None
    assert os.environ["TRITON_INTERPRET"] == "1"


def test_kernels_on_cpu_rerun_the_command_when_kernels_were_defined_for_the_gpu(monkeypatch):
    """Kernels already imported without the interpreter: the command re-runs in a child with it switched on."""
    import sdvae_fast.kernels._common  # noqa: F401  (imported while the interpreter is on, as conftest wants)

    calls = []
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd, env: calls.append((cmd, env)) or 7)
    assert cli._switch_on_interpreter(["parity", "--res", "8"]) == 7
    (cmd, env), = calls
    assert cmd == [sys.executable, "-m", "sdvae_fast.cli", "parity", "--res", "8"] and env["TRITON_INTERPRET"] == "1"
    assert cli._needs_interpreter(cli.build_parser().parse_args(["parity", "--device", "cpu"]))
    assert not cli._needs_interpreter(cli.build_parser().parse_args(["parity", "--device", "cpu", "--backend", "torch"]))
    assert not cli._needs_interpreter(cli.build_parser().parse_args(["reconstruct", "x.png", "-o", "d", "--device", "cpu"]))
    assert cli._needs_interpreter(cli.build_parser().parse_args(["decode", "z", "-o", "d", "--device", "cpu",
                                                                 "--backend", "triton"]))


# ---------------------------------------------------------------------------------------------------------------
# parity / profile / bench
# ---------------------------------------------------------------------------------------------------------------


def test_parity_of_the_decoder_on_cpu_through_the_interpreter_passes(two_level_dir, tmp_path, capsys):
    """The kernels through the interpreter (about a second per launch): the decoder half only, to stay quick."""
    code, stdout, err = _run(["parity", "--vae", two_level_dir, "--res", 8, "--dtype", "fp32", "--batch", 2, "-q",
                              "--decode", "--out", tmp_path], capsys)
    assert code == 0, stdout + err
    assert "PASS" in stdout and "triton float32" in stdout and "## encode" not in stdout
    for unit in ("decoder.mid_block.attentions.0", "decoder.up_blocks.0.upsamplers.0", "decoder.conv_out*",
                 "decode: sample"):
        assert f"| {unit} |" in stdout
    assert (tmp_path / "parity.md").read_text().strip().endswith("**PASS**")


def test_parity_runs_the_reference_on_pytorch_modules_whatever_its_backend(two_level_dir):
    """A reference on the kernel backend (like "auto" on CUDA) would skip every unit hook and compare the kernels
    with themselves: run_parity records the units from a "torch" copy and leaves the caller's model alone."""
    from sdvae_fast.parity import run_parity

    reference = AutoencoderKL.from_pretrained(two_level_dir)
    reference.set_backend("triton")
    report = run_parity(reference, device=torch.device("cpu"), dtype=torch.float32, backend="triton", res=8,
                        parts=("decode",), quiet=True)
    names = [row.name for row in report.rows["decode"]]
    assert "decoder.mid_block.attentions.0" in names and "decode: sample" in names, names
    assert report.passed and reference.backend == "triton"


def test_parity_exits_1_when_a_tolerance_is_exceeded(two_level_dir, capsys):
    """No tolerance at all: bf16 differs from the fp32 reference, so every check fails and the exit code is 1."""
    code, stdout, _ = _run(["parity", "--vae", two_level_dir, "--res", 8, "--dtype", "bf16", "--backend", "torch",
                            "--tol-factor", 0, "--tol-floor", 0, "--psnr-margin", -100, "-q"], capsys)
    assert code == 1
    assert "FAIL" in stdout and stdout.strip().endswith("**FAIL**")
    assert "| encode: latent_dist.mean |" in stdout and "| decode: sample |" in stdout


def test_parity_report_flags_non_finite_output():
    from sdvae_fast.parity import Row, error_stats

    stats = error_stats(torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 2.0]))
    assert stats["nonfinite"] == 1 and math.isinf(stats["rel_l2"]) and stats["worst_index"] == (1,)
    assert not Row("x", (2,), stats, 0.0, 1.0).passed


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
@pytest.mark.parametrize("command", [["profile"], ["bench", "--res", "64"]])
def test_profile_and_bench_without_cuda_say_so_in_one_line(command, capsys):
    code, _, err = _run(command + ["--preset", "sd15"], capsys)
    _assert_one_line_error(code, err, "needs a CUDA device")


def test_profile_units_on_cpu_cover_every_unit_with_flops_and_bytes(two_level_dir):
    """The GPU tool's per-unit logic, run on CPU (perf_counter timing): FLOPs add up to the whole decode's."""
    from torch.utils.flop_counter import FlopCounterMode

    from sdvae_fast.profile import format_rows, profile_part

    vae = AutoencoderKL.from_pretrained(two_level_dir)
    vae.set_backend("torch")
    z = torch.randn(1, 4, 6, 5) + 0.3
    with torch.no_grad():
        rows = profile_part(vae, "decode", z, budget_s=0.0)
        with FlopCounterMode(display=False) as counter:
            vae.decode(z)
    names = [r.name for r in rows]
    assert names[0] == "post_quant_conv" and names[-1] == "decode (end to end)"
    assert "decoder.mid_block.attentions.0" in names and "decoder.conv_out*" in names
    assert rows[-1].gflop == pytest.approx(counter.get_total_flops() / 1e9, rel=1e-9)
    assert all(r.ms > 0 and r.bytes > 0 for r in rows)
    assert "| decoder.conv_out* | 1x3x12x10 |" in format_rows(rows, peak_tflops=1.0)


def test_bench_on_cpu_times_ours_and_diffusers_and_writes_csv_and_markdown(two_level_dir, tmp_path):
    vae = AutoencoderKL.from_pretrained(two_level_dir)
    vae.set_backend("torch")
    rows = bench_mod.run_bench(vae, device=torch.device("cpu"), dtype=torch.float32, resolutions=[16], batch=2,
                               out_dir=tmp_path, name="run", compile_res=0, budget_s=0.0, quiet=True)
    assert {(r.op, r.impl) for r in rows} == {(op, impl) for op in ("encode", "decode")
                                               for impl in ("sdvae-fast", "diffusers eager")}
    assert all(r.ms > 0 and r.gflop > 0 and r.note == "" for r in rows)
    csv_text = (tmp_path / "run.csv").read_text()
    assert csv_text.splitlines()[0].startswith("op,res,batch,dtype,impl,ms,speedup_vs_eager")
    md = (tmp_path / "run.md").read_text()
    assert "| decode | 16 | 2 | fp32 | sdvae-fast |" in md and "- torch: " in md


def test_bench_also_times_the_decode_with_a_separate_statistics_pass_at_compile_res(two_level_dir, tmp_path):
    from sdvae_fast import fast

    vae = AutoencoderKL.from_pretrained(two_level_dir)
    vae.set_backend("torch")
    rows = bench_mod.run_bench(vae, device=torch.device("cpu"), dtype=torch.float32, resolutions=[16],
                               out_dir=tmp_path, name="run", compile_res=16, peers=False, budget_s=0.0, quiet=True)
    assert [(r.op, r.impl) for r in rows] == [("encode", "sdvae-fast"), ("decode", "sdvae-fast"),
                                              ("decode", bench_mod.STATS_PASS)]
    assert all(r.ms > 0 and r.note == "" for r in rows)
    assert fast.EMIT_GN_STATS is True, "the switch is restored after the timed calls"


def test_bench_rows_compute_speedups_tflops_and_percent_of_floor(tmp_path):
    rows = [bench_mod.Row("decode", 1024, 1, "bf16", "diffusers eager", ms=40.0, gflop=9921.0),
            bench_mod.Row("decode", 1024, 1, "bf16", "diffusers compile", ms=30.0, gflop=9921.0),
            bench_mod.Row("decode", 1024, 1, "bf16", "sdvae-fast", ms=20.0, gflop=9921.0)]
    assert bench_mod._speedups(rows, rows[2]) == (2.0, 1.5)
    assert rows[2].tflops == pytest.approx(496.05) and rows[2].pct_floor == pytest.approx(496.05 / 7.9)
    paths = bench_mod.write_results(rows, tmp_path, "x", header="# h")
    assert "| decode | 1024 | 1 | bf16 | sdvae-fast | 20.00 | 2.00 | 1.50 | 496.1 | 62.8 |" in paths["md"].read_text()


# ---------------------------------------------------------------------------------------------------------------
# bench/gpu_check.sh and its CPU-side helpers
# ---------------------------------------------------------------------------------------------------------------


def test_results_stem_names_date_and_gpu():
    day = datetime.date(2026, 11, 29)
    assert bench_mod.results_stem("NVIDIA H200", day) == "2026-11-29-NVIDIA-H200"
    assert bench_mod.results_stem("NVIDIA H100 80GB HBM3 (MIG 1g.10gb)", day) == \
        "2026-11-29-NVIDIA-H100-80GB-HBM3-MIG-1g.10gb"
    if not torch.cuda.is_available():
        assert bench_mod.results_stem(date=day) == "2026-11-29-cpu"


def test_env_info_names_gpu_driver_versions_commit_and_date():
    info = bench_mod.env_info()
    for key in ("date", "gpu", "driver", "torch", "triton", "diffusers", "sdvae_fast_commit", "python"):
        assert key in info
    assert info["torch"] == torch.__version__
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", info["date"])
    assert f"- torch: {torch.__version__}" in bench_mod.env_markdown(info)


def test_gpu_check_script_is_executable_bash_that_parses():
    script = REPO / "bench" / "gpu_check.sh"
    assert script.is_file() and os.access(script, os.X_OK)
    assert script.read_text().startswith("#!/usr/bin/env bash")
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_gpu_check_env_section_writes_the_report_to_results_and_out(tmp_path):
    """The env section runs on CPU; a section left without budget is recorded as skipped; $OUT gets the report and
    one tarball of every result file (a borrowed machine returns at most 8 files)."""
    results, out = tmp_path / "results", tmp_path / "out"
    env = dict(os.environ, SECTIONS="env parity", RESULTS_DIR=str(results), OUT=str(out), BUDGET_S="0",
               PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    reports = list(results.glob("*.md"))
    assert len(reports) == 1 and re.fullmatch(r"\d{4}-\d\d-\d\d-.+\.md", reports[0].name)
    text = reports[0].read_text()
    assert f"- torch: {torch.__version__}" in text and "- sdvae_fast_commit:" in text
    assert "## parity" in text and "skipped" in text
    assert (out / reports[0].name).read_text() == text
    with tarfile.open(out / reports[0].name.replace(".md", "-results.tar.gz")) as tar:  # one file for all results
        env_json = tar.extractfile(reports[0].name.replace(".md", "-env.json")).read()
    assert json.loads(env_json)["torch"] == torch.__version__


def test_entry_point_reports_missing_cuda_without_a_traceback(tmp_path):
    """The installed `sdvae-fast` script (or `python -m sdvae_fast.cli`) in a fresh process."""
    exe = shutil.which("sdvae-fast")
    cmd = [exe] if exe else [sys.executable, "-m", "sdvae_fast.cli"]
    proc = subprocess.run(cmd + ["info", str(tmp_path / "missing.ckpt")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"sdvae-fast info: error: checkpoint not found: {tmp_path / 'missing.ckpt'}"


def test_train_subcommand_is_wired_to_the_trainer(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "sdvae-fast train" in out and "--data" in out


# ---------------------------------------------------------------------------------------------------------------
# New-user trial findings: warnings, flags, presets, backends, images, small edges
# ---------------------------------------------------------------------------------------------------------------


def test_family_guess_is_one_warning_line_naming_cli_options_and_ssim_of_a_1x1_image_is_na(single_files, tmp_path,
                                                                                           capsys):
    code, stdout, err = _run(["reconstruct", single_files["one_pixel_png"], "--vae", single_files["flux_like"],
                              "--out", tmp_path, "--backend", "torch", "-q"], capsys)
    assert code == 0, err
    assert err.count("\n") == 1 and err.startswith("sdvae-fast: warning: "), err
    assert "--preset sd3 (or --scaling-factor 1.5305 --shift-factor 0.0609)" in err
    assert "config=" not in err and "AmbiguousFamilyWarning" not in err
    assert "1x1  PSNR" in stdout and "SSIM n/a" in stdout and "nan" not in stdout


def test_scaling_options_settle_the_family_and_info_shows_them(single_files, capsys):
    code, stdout, err = _run(["info", single_files["flux_like"], "--scaling-factor", 1.5305, "--shift-factor",
                              0.0609, "--json"], capsys)
    assert code == 0 and err == ""
    info = json.loads(stdout)
    assert info["family"] == "sd3" and info["family_certain"]
    assert (info["config"]["scaling_factor"], info["config"]["shift_factor"]) == (1.5305, 0.0609)


def test_refused_pickle_names_the_unsafe_pickle_flag_which_then_loads_it(single_files, capsys):
    code, _, err = _run(["info", single_files["pickle"]], capsys)
    _assert_one_line_error(code, err, "argparse.Namespace", "pass --unsafe-pickle only if you trust this file")
    assert "unsafe_pickle=True" not in err
    code, stdout, _ = _run(["info", single_files["pickle"], "--unsafe-pickle"], capsys)
    assert code == 0 and "format: pickle" in stdout
    help_text = " ".join(cli.build_parser()._subparsers._group_actions[0].choices["encode"].format_help().split())
    assert "--unsafe-pickle" in help_text and "only for files you trust" in help_text


def test_info_honours_preset_and_offers_no_device_options(single_files, monkeypatch, capsys):
    # A preset whose architecture fits the small file: --preset then sets the family and scaling, as on load.
    monkeypatch.setitem(PRESETS, "sdxl", dict(PRESETS["sdxl"], **SMALL_32))
    code, stdout, _ = _run(["info", single_files["sd_like"], "--preset", "sdxl", "--json"], capsys)
    info = json.loads(stdout)
    assert code == 0 and info["family"] == "sdxl" and info["config"]["scaling_factor"] == 0.13025
    for option in (["--device", "cpu"], ["--dtype", "fp16"], ["--backend", "torch"], ["--seed", "1"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(["info", str(single_files["sd_like"]), *option])
        assert exc.value.code == 2
        assert f"unrecognized arguments: {option[0]}" in capsys.readouterr().err


def test_preset_that_does_not_fit_a_single_file_is_a_short_error_saying_what_differs(single_files, tmp_path,
                                                                                      capsys):
    for command in (["reconstruct", "skimage:chelsea", "--out", tmp_path, "--vae"], ["info"]):
        code, _, err = _run([*command, single_files["flux_like"], "--preset", "sdxl"], capsys)
        _assert_one_line_error(code, err, "--preset sdxl does not fit", "the weights have latent_channels=16",
                               "the preset says latent_channels=4", "Omit --preset")
        assert len(err) < 600 and "missing key" not in err


def test_long_loader_errors_leave_their_key_lists_out_of_the_one_line(capsys):
    from sdvae_fast.loading import CheckpointError

    listed = "\n  ".join(f"decoder.up_blocks.{i}.conv.weight" for i in range(40))
    exc = CheckpointError(f"x.safetensors: the checkpoint does not fit AutoencoderKL(...).\n40 missing key(s):\n  "
                          f"{listed}\nThe weights imply latent_channels=16; omit config= to infer them.")
    line = cli._one_line(exc)
    assert "decoder.up_blocks" not in line and "40 missing key(s)" in line and "SDVAE_FAST_DEBUG=1" in line


def test_backend_default_is_the_models_environment_variable_and_a_bad_value_is_one_line(single_files, tmp_path,
                                                                                          monkeypatch, capsys):
    parser = cli.build_parser()
    args = parser.parse_args(["decode", "z", "-o", "d", "--device", "cpu"])
    assert args.backend is None
    monkeypatch.setenv("SDVAE_FAST_BACKEND", "triton")
    assert cli.resolve_backend(None) == "triton" and cli.resolve_backend("torch") == "torch"
    args.backend = cli.resolve_backend(args.backend)
    assert cli._needs_interpreter(args)
    monkeypatch.setenv("SDVAE_FAST_BACKEND", "torch")
    vae_args = Namespace(vae=str(single_files["sd_like"]), preset=None, seed=0, device="cpu", dtype=None,
                         backend=None, scaling_factor=0.18215, shift_factor=None, unsafe_pickle=False)
    assert cli.load_vae(vae_args).backend == "torch"
    monkeypatch.setenv("SDVAE_FAST_BACKEND", "fastest")
    code, _, err = _run(["decode", tmp_path / "z.safetensors", "-o", tmp_path, "--backend", "torch"], capsys)
    _assert_one_line_error(code, err, "SDVAE_FAST_BACKEND='fastest'", "auto, triton, torch")
    assert len(err) < 200


def test_sixteen_bit_grayscale_png_is_scaled_to_8_bits_not_clipped_to_white(tmp_path):
    rng = np.random.default_rng(0)
    levels = rng.integers(1000, 65535, size=(5, 7), dtype=np.uint16)  # (H, W) 16-bit samples
    path = tmp_path / "gray16.png"
    Image.fromarray(levels).save(path)
    assert Image.open(path).mode in ("I;16", "I")
    x = load_image(path)  # (1, 3, 5, 7) in [-1, 1]
    expected = torch.from_numpy(levels / 257.0).float() / 127.5 - 1.0
    assert x.shape == (1, 3, 5, 7) and x.max() < 1.0
    for channel in range(3):
        torch.testing.assert_close(x[0, channel], expected, rtol=0, atol=1e-6)
    big_endian = Image.fromarray(levels).convert("I").convert("I;16B")
    torch.testing.assert_close(load_image(big_endian), x, rtol=0, atol=1e-6)


def test_a_closed_stdout_ends_quietly(narrow_dir, monkeypatch, capsys):
    read_end, write_end = os.pipe()
    os.close(read_end)
    with os.fdopen(write_end, "w") as closed_pipe:
        monkeypatch.setattr(sys, "stdout", closed_pipe)
        code = cli.main(["info", str(narrow_dir), "--json"])
        monkeypatch.undo()
    assert code == 141 and capsys.readouterr().err == ""


def test_debug_mode_prints_the_traceback_and_still_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SDVAE_FAST_DEBUG", "1")
    code, _, err = _run(["info", tmp_path / "missing.pt"], capsys)
    assert code == 2 and "Traceback" in err
    assert err.strip().endswith(f"checkpoint not found: {tmp_path / 'missing.pt'}")


def test_decode_of_a_weights_file_fails_before_any_model_or_progress_bar(single_files, tmp_path, capsys):
    code, _, err = _run(["decode", single_files["flux_like"], "--out", tmp_path / "dec"], capsys)
    _assert_one_line_error(code, err, "looks like model weights", "--vae")
    assert "%|" not in err and not (tmp_path / "dec").exists()  # no progress bar, no output folder


def test_decode_of_latents_from_another_vae_says_which_and_warns_on_other_scaling(single_files, tmp_path, capsys):
    meta = {"format": LATENTS_FORMAT, "scaling_factor": "0.3611", "shift_factor": "0.1159",
            "config": json.dumps({"latent_channels": 16})}
    flux_latents = tmp_path / "flux.safetensors"
    save_file({"a": torch.randn(1, 16, 2, 2) + 0.2}, str(flux_latents), metadata=meta)
    code, _, err = _run(["decode", flux_latents, "--vae", single_files["sd_like"], "--out", tmp_path, "-q",
                         "--scaling-factor", 0.18215], capsys)
    _assert_one_line_error(code, err, "16 latent channels", "flux1", "this VAE has 4", "--preset flux1")
    sdxl_latents = tmp_path / "sdxl.safetensors"
    meta.update(scaling_factor="0.13025", shift_factor="0.0", config=json.dumps({"latent_channels": 4}))
    save_file({"b": torch.randn(1, 4, 2, 2) + 0.2}, str(sdxl_latents), metadata=meta)
    code, _, err = _run(["decode", sdxl_latents, "--vae", single_files["sd_like"], "--out", tmp_path, "-q",
                         "--scaling-factor", 0.18215, "--backend", "torch"], capsys)
    assert code == 0 and "sdxl family" in err and "latent space differs" in err
    assert Image.open(tmp_path / "b.png").size == (4, 4)


def test_every_option_has_help_with_its_default_and_test_presets_are_hidden():
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, sub in commands.items():
        if name == "train":
            continue
        for action in sub._actions:
            if action.option_strings and action.help is not argparse.SUPPRESS:
                assert action.help, f"{name} {action.option_strings} has no help text"
                if action.default not in (None, False, argparse.SUPPRESS) and action.dest != "help":
                    assert "default" in action.help, f"{name} {action.option_strings} hides its default"
        text = sub.format_help()
        assert "diffusers_test" not in text
    assert "default 512 1024 2048" in " ".join(commands["bench"].format_help().split())
    assert "images per batch" in commands["profile"].format_help()
    assert "n/a for images smaller than 7 pixels" in " ".join(commands["reconstruct"].format_help().split())


def test_gpu_check_script_header_restates_the_recipe_without_files_a_clone_lacks():
    header = (REPO / "bench" / "gpu_check.sh").read_text().split("set -uo pipefail")[0]
    assert "shared/" not in header
    assert "pip download" in header and "carry" in header and "bash bench/gpu_check.sh" in header


def test_the_shipped_vae_is_accepted_by_name_in_info_and_vae(tmp_path, capsys):
    code, stdout, _ = _run(["info", "sdvae-fast/tiny"], capsys)
    assert code == 0 and "diffusers" in stdout
    small = tmp_path / "small.png"
    Image.fromarray(np.full((16, 24, 3), 90, np.uint8)).save(small)
    code, stdout, _ = _run(["reconstruct", small, "--vae", "sdvae-fast/tiny", "--out", tmp_path / "o", "-q"], capsys)
    assert code == 0 and (tmp_path / "o" / "small.png").exists()


# ---------------------------------------------------------------------------------------------------------------
# Issue 15: group counts on the command line, warm-up-free timing, alpha, presets, train -q, parity's cost
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def four_group_file(tmp_path_factory):
    """A VAE-only file of a VAE trained with 4 GroupNorm groups (widths 8/16: 32 groups cannot apply), without
    metadata, and its diffusers config.json in another folder."""
    folder = tmp_path_factory.mktemp("groups")
    vae = AutoencoderKL.from_preset("sd15", seed=5, **TWO_LEVEL)
    (folder / "file").mkdir()
    path = folder / "file" / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(path))
    vae.save_pretrained(folder / "folder")
    return path, folder / "folder" / "config.json"


def test_group_count_options_load_a_single_file_and_info_marks_assumed_values(four_group_file, single_files,
                                                                              tmp_path, capsys):
    path, config_json = four_group_file
    code, _, err = _run(["reconstruct", single_files["one_pixel_png"], "--vae", path, "--out", tmp_path,
                         "--backend", "torch", "-q"], capsys)
    _assert_one_line_error(code, err, "norm_num_groups=32 (assumed", "Pass --norm-num-groups N", "[1, 2, 4, 8]",
                           "--config path/to/config.json")
    for option in (["--norm-num-groups", 4], ["--config", config_json]):
        code, stdout, err = _run(["reconstruct", single_files["one_pixel_png"], "--vae", path, "--out", tmp_path,
                                  "--backend", "torch", "-q", *option], capsys)
        assert code == 0, err
    code, stdout, _ = _run(["info", path, "--norm-num-groups", 4, "--json"], capsys)
    info = json.loads(stdout)
    assert info["config"]["norm_num_groups"] == 4 and info["config_sources"]["norm_num_groups"] == "--norm-num-groups"
    code, stdout, _ = _run(["info", path, "--config", config_json, "--json"], capsys)
    info = json.loads(stdout)
    assert info["config"]["norm_num_groups"] == 4 and info["config_sources"]["scaling_factor"] == "--config"
    # A file whose group count nothing states: info says "assumed" beside the value and names the option.
    code, stdout, _ = _run(["info", single_files["pickle"], "--unsafe-pickle"], capsys)
    line = next(line for line in stdout.splitlines() if line.strip().startswith("norm_num_groups: 32"))
    assert code == 0 and "32  (assumed" in line and "--norm-num-groups" in line, line
    assert "config sources:" in stdout
    # The metadata-carrying file is not assumed.
    code, stdout, _ = _run(["info", single_files["sd_like"]], capsys)
    line = next(line for line in stdout.splitlines() if line.strip().startswith("norm_num_groups: 32"))
    assert "assumed" not in line and "norm_num_groups: file metadata" in stdout


def test_reconstruct_times_exclude_warm_up_and_say_how_many_runs_the_median_is_over(narrow_dir, photos, tmp_path,
                                                                                  monkeypatch, capsys):
    # A fake clock that only encode advances: the first encode costs 5 s (as kernel compilation would), every
    # later one 2 ms. Printed times then show exactly which encodes were timed.
    clock = [0.0]
    monkeypatch.setattr(cli, "time", argparse.Namespace(perf_counter=lambda: clock[0]))
    load = cli.load_vae
    calls = []

    def slow_first_call(*args, **kwargs):
        vae = load(*args, **kwargs)
        encode = vae.encode

        def timed_encode(x):
            calls.append(tuple(x.shape))
            clock[0] += 5.0 if len(calls) == 1 else 0.002
            return encode(x)

        vae.encode = timed_encode
        return vae

    monkeypatch.setattr(cli, "load_vae", slow_first_call)
    images = [photos[0], photos[0], photos[1]]  # two sizes: 96x64 twice, then 99x67 (padded to 104x72)
    code, stdout, err = _run(["reconstruct", *images, "--vae", narrow_dir, "--out", tmp_path, "--backend",
                              "torch", "-q"], capsys)
    assert code == 0, err
    times = [float(m) for m in re.findall(r"([\d.]+) ms$", stdout, flags=re.M)]
    assert times == [2.0, 2.0, 2.0], stdout  # the 5 s first call was the untimed warm-up
    assert len(calls) == 5  # a warm-up run at each of the two sizes, and one timed run per image
    assert "median 2.0 ms per image over 3 timed runs" in stdout and "warm-up excluded" in stdout, stdout
    help_text = " ".join(cli.build_parser()._subparsers._group_actions[0].choices["reconstruct"].format_help()
                         .split())
    assert "Times exclude warm-up" in help_text


def test_rgba_images_are_composited_over_white_with_a_warning(tmp_path, capsys):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200  # red, stored under transparent pixels too
    rgba[:4, :, 3] = 255  # top half opaque
    rgba[4:, :, 3] = 0  # bottom half fully transparent
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(path)
    from sdvae_fast.images import AlphaCompositedWarning

    with pytest.warns(AlphaCompositedWarning, match=r"32 of 64 pixels not fully opaque: composited over a white"):
        x = load_image(path)
    pixels = (x[0].permute(1, 2, 0) + 1) * 127.5  # (H, W, 3) in [0, 255]
    assert torch.allclose(pixels[0, 0], torch.tensor([200.0, 0.0, 0.0]), atol=1e-3)
    assert torch.allclose(pixels[7, 7], torch.tensor([255.0, 255.0, 255.0]), atol=1e-3)
    # Fully opaque alpha: nothing to composite, no warning.
    rgba[..., 3] = 255
    Image.fromarray(rgba, "RGBA").save(path)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_image(path)
    # The command line prints the warning as one line.
    rgba[4:, :, 3] = 0
    Image.fromarray(rgba, "RGBA").save(path)
    cli._load_images([str(path)])
    err = capsys.readouterr().err
    assert err.startswith("sdvae-fast: warning: ") and "composited over a white background" in err
    assert err.count("\n") == 1


def test_readme_and_help_list_exactly_the_public_presets():
    """README lists the model presets (PUBLIC_PRESETS) and the command line's (CLI_PRESETS: those plus FLUX.2's,
    then the VQ presets), as `--preset` offers them (every command's, info's included)."""
    from sdvae_fast.configs import CLI_PRESETS, PUBLIC_PRESETS, TEST_PRESETS, VQ_PRESETS

    assert set(PUBLIC_PRESETS) | set(TEST_PRESETS) == set(PRESETS)
    readme = (REPO / "README.md").read_text()
    lists = re.findall(r"`(--preset )?((?:[\w-]+\|)+[\w-]+)`", readme)
    preset_lists = [(flag, found) for flag, found in lists if "sd15" in found]
    assert {bool(flag) for flag, _ in preset_lists} == {False, True}, lists
    for flag, found in preset_lists:
        assert found.split("|") == list(CLI_PRESETS + tuple(VQ_PRESETS) if flag else PUBLIC_PRESETS), found
    for command in ("reconstruct", "info"):
        preset_action = next(a for a in cli.build_parser()._subparsers._group_actions[0].choices[command]._actions
                             if "--preset" in a.option_strings)
        assert tuple(preset_action.choices) == CLI_PRESETS + tuple(VQ_PRESETS)  # VQ models: tests/test_cli_vq.py
    from sdvae_fast.train import add_train_arguments

    train_action = next(a for a in add_train_arguments(argparse.ArgumentParser())._actions
                        if "--preset" in a.option_strings)
    assert tuple(train_action.choices) == PUBLIC_PRESETS


def test_train_accepts_quiet_like_the_other_commands():
    from sdvae_fast.train import TrainConfig, add_train_arguments

    parser = add_train_arguments(argparse.ArgumentParser())
    for flag in ("-q", "--quiet"):
        args = parser.parse_args(["--data", "d", "--out", "o", flag])
        assert TrainConfig.from_args(args).progress is False
    assert TrainConfig.from_args(parser.parse_args(["--data", "d", "--out", "o"])).progress is True


def test_parity_help_states_the_measured_cpu_cost():
    text = " ".join(cli.build_parser()._subparsers._group_actions[0].choices["parity"].format_help().split())
    assert "several minutes per image" not in text and "a few minutes" not in text
    assert "about 11 minutes" in text


def test_info_preset_accepts_every_preset_its_help_names():
    """`info --preset` takes the FLUX.2 and VQ presets its help describes (it reads such single files with them)."""
    parser = cli.build_parser()
    for name in ("sd15", "sdxl", "sd3", "flux1", "tiny", "flux2", "flux2-small", "vq-f4", "vq-f8"):
        assert parser.parse_args(["info", "x.safetensors", "--preset", name]).preset == name
    help_text = " ".join(parser._subparsers._group_actions[0].choices["info"].format_help().split())
    assert "flux2, flux2-small, vq-f4, vq-f8" in help_text


def test_decode_reports_a_three_dimensional_tensor_with_its_shape_in_the_file(tmp_path, capfd):
    """A (C, h, w) tensor of the wrong width is reported as stored, not with the batch dimension decode adds; for
    FLUX.2's BatchNorm path too (a small AutoencoderKLFlux2 folder, whose load prints no accelerate notice;
    capfd, since diffusers' log handler writes to the stderr it found at import)."""
    from sdvae_fast import AutoencoderKLFlux2

    latents = tmp_path / "lat3.safetensors"
    save_file({"a": torch.randn(3, 6, 6)}, str(latents))
    code, _, err = _run(["decode", latents, "--backend", "torch", "--out", tmp_path, "-q"], capfd)
    assert code == 2 and "has shape (3, 6, 6)" in err and "(N, 4, h, w) or (4, h, w)" in err
    folder = tmp_path / "flux2"
    AutoencoderKLFlux2(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                       up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, layers_per_block=1,
                       latent_channels=4).save_pretrained(folder)
    code, _, err = _run(["decode", latents, "--vae", folder, "--backend", "torch", "--out", tmp_path, "-q"], capfd)
    assert code == 2 and "tensor 'a' has shape (3, 6, 6); FLUX.2's VAE expects patchified latents (N, 16, h, w)" in err
    assert "accelerate" not in err and len(err.strip().splitlines()) == 1


def test_decode_help_describes_flux2_and_vq_latents(capsys):
    with pytest.raises(SystemExit):
        cli.main(["decode", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "z / scaling_factor + shift_factor" in text and "BatchNorm" in text and "patchify" in text
    assert "vq_embed_dim" in text and "quantised" in text


def test_parity_prints_a_legend_for_the_starred_head_rows(monkeypatch, capsys):
    """The `*` of `encoder.conv_out*` is explained under the table the CLI prints (parity itself is stubbed)."""
    from types import SimpleNamespace

    from sdvae_fast import parity

    report = SimpleNamespace(rows={"encode": [SimpleNamespace(name="encoder.conv_out*")]}, passed=True,
                             format=lambda: "| encoder.conv_out* | ... |\n\n**PASS**")
    monkeypatch.setattr(parity, "run_parity", lambda *a, **k: report)
    monkeypatch.setattr(cli, "load_vae", lambda *a, **k: None)
    code, stdout, _ = _run(["parity", "--preset", "tiny", "--device", "cpu", "--backend", "torch", "-q"], capsys)
    assert code == 0 and "*: the output head, conv_norm_out -> conv_act -> conv_out" in stdout
    assert stdout.strip().endswith("**PASS**")  # the verdict stays the last line
