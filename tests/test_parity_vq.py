"""`sdvae-fast parity` and `profile` with VQ models (`sdvae_fast.VQModel`, issue 14).

Narrow two-level models (factor 2, so small images still give several latent pixels), weights seeded and
perturbed so norms and biases are not at their defaults:
- VQ-f8-like: attention inside the second down block and the first up block (`AttnDownEncoderBlock2D` /
  `AttnUpDecoderBlock2D`, head dim 16), GroupNorm with 4 groups;
- MoVQ-like: `norm_type="spatial"` (SpatialNorm, whose units run their module forwards with the quantised latents),
  `lookup_from_codebook=True` (its decode of already quantised latents takes codes).
parity runs the kernels under the Triton interpreter in fp32 (about a second per launch on CPU); the near-tie rule
of the quantiser row and profile's per-unit part are checked on CPU without the interpreter.
"""
import re

import pytest
import torch

pytest.importorskip("diffusers")

from sdvae_fast import VQModel, cli, parity  # noqa: E402

TWO_LEVELS = dict(down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
                  up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"), layers_per_block=1)
VQ_NARROW = dict(TWO_LEVELS, block_out_channels=(8, 16), latent_channels=4, num_vq_embeddings=32, norm_num_groups=4)
MOVQ_NARROW = dict(TWO_LEVELS, block_out_channels=(32, 32), latent_channels=4, vq_embed_dim=4, num_vq_embeddings=32,
                   norm_num_groups=8, norm_type="spatial", lookup_from_codebook=True)
ATTENTION_UNITS = ("encoder.down_blocks.1.attentions.0", "encoder.mid_block.attentions.0",
                   "decoder.mid_block.attentions.0", "decoder.up_blocks.0.attentions.0",
                   "decoder.up_blocks.0.attentions.1")


def _model(config: dict, seed: int) -> VQModel:
    torch.manual_seed(seed)
    model = VQModel(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def vq_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vq_narrow")
    _model(VQ_NARROW, seed=0).save_pretrained(folder)
    return folder


def _run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_parity_cli_on_a_vq_folder_passes_on_the_kernels_with_attention_and_quantiser_rows(vq_dir, tmp_path,
                                                                                           capsys):
    """The whole run (encode and decode) on backend "auto" (the kernels through the interpreter) in fp32: every
    unit has a row, the attention units inside the attention levels included, the quantiser's row streams and is
    in the table, and the report passes. 8x8 images (4x4 latents, 16 codes): the interpreter's cost is per launch,
    and --res 16 cost about 30% more CPU time here for the same launches."""
    code, stdout, err = _run(["parity", "--vae", vq_dir, "--device", "cpu", "--dtype", "fp32", "--res", 8, "-q",
                              "--out", tmp_path], capsys)
    assert code == 0, stdout + err
    assert "triton float32" in stdout and stdout.strip().endswith("**PASS**")
    line = next(s for s in stdout.splitlines() if s.startswith("quantize: z_q: rel_l2"))  # streamed as computed
    equal, count = map(int, re.search(r"codes (\d+)/(\d+) \(", line).groups())
    assert count == 4 * 4 and equal >= count - 1 and line.endswith(" ok"), line  # 8x8 images, factor 2
    assert "| quantize: z_q |" in stdout and "## quantiser codes" in stdout
    units = parity.unit_names(VQModel.from_pretrained(vq_dir))
    assert set(ATTENTION_UNITS) <= set(units)
    for name in units + ["encode: latents", "decode: sample"]:
        row = next((s for s in stdout.splitlines() if s.startswith(f"| {name} |")), None)
        assert row is not None and row.endswith("| ok |"), (name, row)
    decode_rows = stdout.split("## decode")[1].splitlines()
    assert decode_rows[4].startswith("| quantize: z_q |")  # the quantiser comes first in the decode table
    assert "| decode (the reference's codes) |" in stdout
    assert (tmp_path / "parity.md").read_text().strip().endswith("**PASS**")


def test_movq_parity_hands_spatial_norm_units_the_recorded_quantised_latents_and_passes():
    """MoVQ's SpatialNorm units (conditioned resnets, attention with spatial_norm, the SpatialNorm head) fall back
    to their module forwards; teacher-forced they get the quantised latents their module received in the reference
    run (without them they raise). The decode on the kernels (conv_in, upsamplers, the quantiser) passes."""
    model = _model(MOVQ_NARROW, seed=1)
    report = parity.run_parity(model, device=torch.device("cpu"), dtype=torch.float32, backend="triton", res=8,
                               parts=("decode",), quiet=True)
    assert report.passed, report.markdown()
    rows = {row.name: row for row in report.rows["decode"]}
    spatial = ("decoder.mid_block.resnets.0", "decoder.up_blocks.0.attentions.1", "decoder.conv_out*")
    unsupported = dict(report.unsupported)
    assert unsupported["decoder.conv_out*"] == "conv_norm_out is SpatialNorm, not nn.GroupNorm"
    assert unsupported["decoder.up_blocks.0.attentions.1"] == "spatial_norm is set"
    for name in spatial:
        assert name in unsupported and rows[name].passed and rows[name].stats["rel_l2"] < 1e-6, name
    assert "decoder.up_blocks.0.upsamplers.0" not in unsupported and rows["decoder.up_blocks.0.upsamplers.0"].passed
    quantizer = report.rows["decode"][0]
    assert isinstance(quantizer, parity.QuantizerRow) and quantizer.name == "quantize: z_q"
    assert quantizer.count == 4 * 4 and quantizer.beyond == 0 and quantizer.torch_equal == quantizer.count
    assert [i.name for i in report.images] == ["decode (the reference's codes)"]

    # run alone, a SpatialNorm unit needs the latents: the head's recorded call carries them, and both paths use them
    captures = []
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), parity.record_units(model, captures):
        model.set_backend("torch")
        model.decode(z)
    head = next(c for c in captures if c.name == "decoder.conv_out*")
    assert head.args[1].shape == (1, 4, 4, 4)  # the quantised latents reached the head's SpatialNorm
    with torch.no_grad():
        for fast_path in (True, False):
            got = parity.run_unit(model, head.name, head.args, head.kwargs, fast_path=fast_path)
            torch.testing.assert_close(got, head.output, rtol=0, atol=0)


def test_quantiser_row_accepts_a_differing_code_only_within_the_dtypes_near_tie_margin():
    """Codes e0 = (1, 0), e1 = (0, 1), e2 = (3, 3). Latent pixel 0 lies 0.002 (squared distance) closer to e0 than
    to e1, pixel 1 on e0. Choosing e1 at pixel 0 is a near tie in bf16 (rounding moves such distances by ~1e-2)
    but not in fp32; choosing e1 at pixel 1 (2.0 worse) is never one, and fails the row."""
    codebook = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 3.0]])
    h = torch.tensor([[0.501, 1.0], [0.5, 0.0]]).reshape(1, 2, 1, 2)  # (N, D, h, w): pixels (0.501, 0.5), (1, 0)
    ref = torch.tensor([0, 0])
    excess, margin = parity.near_tie_margin(h, codebook, torch.tensor([1, 0]), ref, torch.bfloat16)
    assert excess[0].item() == pytest.approx(0.002, rel=1e-4) and excess[1].item() == 0.0
    assert excess[0] <= margin[0]
    _, margin32 = parity.near_tie_margin(h, codebook, torch.tensor([1, 0]), ref, torch.float32)
    assert excess[0] > margin32[0]
    excess, margin = parity.near_tie_margin(h, codebook, torch.tensor([0, 1]), ref, torch.bfloat16)
    assert excess[1].item() == pytest.approx(2.0) and excess[1] > margin[1]

    stats = {"max_abs": 0.0, "rel_l2": 0.0, "worst_index": (), "nonfinite": 0}
    near = parity.QuantizerRow("quantize: z_q", (1, 2, 1, 2), stats, 0.0, 1e-4, equal=1, count=2, torch_equal=2,
                               beyond=0)
    far = parity.QuantizerRow("quantize: z_q", (1, 2, 1, 2), stats, 0.0, 1e-4, equal=1, count=2, torch_equal=2,
                              beyond=1)
    assert near.passed and near.line().endswith("1 near ties, 0 beyond the near-tie margin ok")
    assert not far.passed and far.line().endswith("FAIL")
    report = parity.ParityReport("t", rows={"decode": [far]})
    assert "| quantize: z_q | 1/2 | 2/2 | 0 | 1 | FAIL |" in report.markdown() and not report.passed


def test_profile_command_takes_a_vq_model_and_profiles_its_units_on_cpu(vq_dir, tmp_path, capsys, monkeypatch):
    """profile needs CUDA for its timings; with that check and the GPU-only run_profile replaced by its CPU-side
    parts (`input_shape`, `profile_part`), the command builds the VQModel and lists and times every unit."""
    from sdvae_fast import profile

    seen = {}

    def cpu_run_profile(vae, *, device, dtype, res, batch, parts, out_dir):
        for part in parts:
            x = torch.randn(profile.input_shape(vae, part, batch, res), dtype=dtype)
            seen[part] = (x.shape, profile.profile_part(vae, part, x, budget_s=0.0))
        seen["model"] = vae

    monkeypatch.setattr(cli, "_require_cuda", lambda command, device: None)
    monkeypatch.setattr(profile, "run_profile", cpu_run_profile)
    code, _, err = _run(["profile", "--vae", vq_dir, "--device", "cpu", "--dtype", "fp32", "--res", 16, "--out",
                         tmp_path], capsys)
    assert code == 0, err
    assert type(seen["model"]).__name__ == "VQModel"
    units = parity.unit_names(seen["model"])
    (enc_shape, enc_rows), (dec_shape, dec_rows) = seen["encode"], seen["decode"]
    assert tuple(enc_shape) == (1, 3, 16, 16) and tuple(dec_shape) == (1, 4, 8, 8)
    assert [r.name for r in enc_rows] == [u for u in units if u.startswith(("encoder.", "quant_conv"))] + [
        "encode (end to end)"]
    assert enc_rows[-1].shape == (1, 4, 8, 8)  # the unquantised latents
    assert [r.name for r in dec_rows][:2] == ["post_quant_conv", "decoder.conv_in"]
    assert {"decoder.up_blocks.0.attentions.1", "decoder.conv_out*"} <= {r.name for r in dec_rows}
    assert dec_rows[-1].name == "decode (end to end)" and dec_rows[-1].shape == (1, 3, 16, 16)

    # the latents profile draws: the codebook's width (vq_embed_dim) at the model's downscale factor (here 4)
    three = VQModel(**dict(VQ_NARROW, down_block_types=("DownEncoderBlock2D",) * 3,
                           up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 8, 16), vq_embed_dim=3))
    assert parity.downscale_factor(three) == 4 and profile.input_shape(three, "decode", 2, 32) == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="multiple of 4"):
        profile.input_shape(three, "decode", 1, 18)


def test_profile_of_a_movq_decoder_runs_its_spatial_norm_head_with_the_recorded_latents():
    """The PyTorch forward profile counts FLOPs on: the SpatialNorm head gets its recorded quantised latents."""
    from sdvae_fast.profile import profile_part

    model = _model(MOVQ_NARROW, seed=2)
    model.set_backend("torch")
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        rows = {r.name: r for r in profile_part(model, "decode", z, budget_s=0.0)}
    assert rows["decoder.conv_out*"].gflop > 0 and rows["decoder.up_blocks.0.attentions.0"].gflop > 0
    assert rows["decode (end to end)"].shape == (1, 3, 8, 8)
