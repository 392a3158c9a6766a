"""The unit registry (sdvae_fast/fast/units.py), the derived-weight cache and the package's structure rules.

What these prove: one list of units serves the walker, parity and profile, for our model and diffusers' alike; an
unsupported module is reported by name with its reason and still gives the module's own result; a new block type
is one registration; the patch-parallel hooks of the run context are where units call them; derived weights
follow one invalidation rule; no module imports another in a circle, and no file cites a folder outside the
repository.
"""
import gc
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from sdvae_fast import fast, ops
from sdvae_fast.fast import units
from sdvae_fast.kernels._common import DerivedCache
from tests import golden
from tests.helpers import assert_close

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def vae():
    return golden.make_vae()


def test_iter_units_lists_every_unit_of_ours_and_diffusers_alike_all_on_the_kernels(vae):
    diffusers = pytest.importorskip("diffusers", reason="compares unit lists with diffusers' AutoencoderKL")
    theirs = diffusers.AutoencoderKL(**golden.CONFIG)
    ours_units, their_units = fast.iter_units(vae), fast.iter_units(theirs)
    assert [(u.name, u.kind) for u in ours_units] == [(u.name, u.kind) for u in their_units]
    assert fast.unsupported_units(vae) == [] and fast.unsupported_units(theirs) == []
    kinds = {u.kind for u in ours_units}
    assert kinds == {"Conv2d", "ResnetBlock2D", "Downsample2D", "Upsample2D", "Attention", "head"}
    names = [u.name for u in ours_units]
    assert names[0] == "encoder.conv_in" and "encoder.conv_out*" in names and names[-1] == "decoder.conv_out*"
    assert "decoder.mid_block.attentions.0" in names and "quant_conv" in names and "post_quant_conv" in names


def test_an_unsupported_module_is_reported_by_name_and_runs_its_own_forward(vae):
    model = golden.make_vae()
    block = model.decoder.up_blocks[0].resnets[0]
    block.nonlinearity = nn.GELU()
    reasons = dict(fast.unsupported_units(model))
    assert reasons == {"decoder.up_blocks.0.resnets.0": "nonlinearity is not SiLU"}
    unit = {u.name: u for u in fast.iter_units(model)}["decoder.up_blocks.0.resnets.0"]
    x = torch.randn(1, 64, 3, 2)
    with torch.no_grad():
        assert torch.equal(unit.run_alone(x), block(x, None))


def test_an_unregistered_class_is_reported_with_its_class_name():
    model = golden.make_vae()

    class MyConv(nn.Conv2d):
        pass

    old = model.decoder.conv_in
    model.decoder.conv_in = MyConv(old.in_channels, old.out_channels, 3, padding=1)
    assert dict(fast.unsupported_units(model)) == {"decoder.conv_in": "no unit is registered for class MyConv"}


def test_a_new_block_type_is_one_registration():
    model = golden.make_vae()
    down_block_class = type(model.encoder.down_blocks[0])
    renamed = type("MyDownBlock", (down_block_class,), {})
    model.encoder.down_blocks[0].__class__ = renamed
    assert dict(fast.unsupported_units(model)) == {
        "encoder.down_blocks.0": "no block is registered for class MyDownBlock"}
    try:
        fast.register_block("MyDownBlock")(units.BLOCK_TYPES["DownEncoderBlock2D"])
        assert fast.unsupported_units(model) == []
        names = [u.name for u in fast.iter_units(model)]
        assert "encoder.down_blocks.0.resnets.0" in names and "encoder.down_blocks.0.downsamplers.0" in names
    finally:
        units.BLOCK_TYPES.pop("MyDownBlock", None)


def test_registering_a_class_twice_is_an_error():
    with pytest.raises(ValueError, match="ResnetBlock2D"):
        fast.register_unit("ResnetBlock2D", why_not=lambda m: None)(lambda *a: None)
    with pytest.raises(ValueError, match="UNetMidBlock2D"):
        fast.register_block("UNetMidBlock2D")(lambda b: [])


class _CountingHooks(fast.ParallelHooks):
    """One 'rank' holding the whole image, through every hook: counts the halo requests (returning the band and
    padding unchanged: this rank has no neighbours), the upsample, K/V-gather and stage-end requests, and merges
    GroupNorm statistics from partials."""

    def __init__(self):
        self.convs = self.merges = self.upsamples = self.attentions = self.stages = 0

    def upsample_input(self, x):
        self.upsamples += 1
        return super().upsample_input(x)

    def gather_tokens(self, kv):
        self.attentions += 1
        return super().gather_tokens(kv)

    def end_stage(self, y, check_finite):
        self.stages += 1
        return super().end_stage(y, check_finite)

    def conv_input(self, x, padding, kernel_size, stride):
        self.convs += 1
        assert kernel_size == 3 and len(padding) == 4
        return x, padding

    def merge_stats(self, partials, eps):
        self.merges += 1
        return super().merge_stats(partials, eps)


def test_patch_parallel_hooks_are_called_before_every_spatial_conv_and_every_group_norm(vae):
    z = torch.randn(2, 4, 3, 2, generator=torch.Generator().manual_seed(3)) + 0.5
    hooks = _CountingHooks()
    saved = fast.EMIT_GN_STATS
    try:
        fast.EMIT_GN_STATS = False
        with torch.no_grad():
            expected = fast.decode_sample(vae, z)
            stages = units.decoder_units(vae.decoder, vae.post_quant_conv)
            got = fast.run_stages(stages, z, fast.RunContext(emit_stats=False, parallel=hooks)).contiguous()
    finally:
        fast.EMIT_GN_STATS = saved
    spatial = [m for m in vae.decoder.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    upsample_convs = sum(len(b.upsamplers or []) for b in vae.decoder.up_blocks)
    norms = [m for m in vae.decoder.modules() if isinstance(m, nn.GroupNorm)]
    attentions = [m for m in vae.decoder.modules() if type(m).__name__ == "Attention"]
    assert hooks.convs == len(spatial) - upsample_convs  # the upsample op takes its halo through upsample_input
    assert hooks.upsamples == upsample_convs and hooks.attentions == len(attentions) == 1
    assert hooks.merges == len(norms)  # the attention's GroupNorm too: its queries, keys and values are per band
    assert hooks.stages == len(stages)
    assert_close(got, expected, rel_l2=1e-6, name="decode through the hooks")
    emitting = _CountingHooks()  # the producers' partials (emitted in the conv epilogues) merged instead
    with torch.no_grad():
        got = fast.run_stages(stages, z, fast.RunContext(emit_stats=True, parallel=emitting)).contiguous()
    assert emitting.merges == len(norms)
    assert_close(got, expected, rel_l2=1e-6, name="decode through the hooks, emitted partials")


def test_derived_cache_rebuilds_after_in_place_change_and_drops_freed_sources():
    cache = DerivedCache()
    w = torch.randn(4, 4)
    first = cache.get((w, None), "t", lambda: w * 2)
    assert cache.get((w, None), "t", lambda: w * 3) is first and cache.builds["t"] == 1
    with torch.no_grad():
        w.add_(1.0)
    again = cache.get((w, None), "t", lambda: w * 2)
    assert again is not first and torch.equal(again, w * 2) and cache.builds["t"] == 2
    assert cache.get((w, None), ("t", torch.float16), lambda: w.half()) is not again  # tags key separately
    assert len(cache) == 2
    del w
    gc.collect()
    assert len(cache) == 0, "an entry must die with its source tensor"


def test_fused_qkv_and_folded_quant_conv_live_in_the_one_derived_cache():
    from sdvae_fast.kernels._common import derived_weights

    vae = golden.make_vae()  # fresh weights: nothing derived from them yet
    attn = vae.decoder.mid_block.attentions[0]
    before = derived_weights.builds["fused_qkv"]
    w1 = fast.fused_qkv_weights(attn, torch.float32, "cpu")[0]
    assert fast.fused_qkv_weights(attn, torch.float32, "cpu")[0] is w1
    assert derived_weights.builds["fused_qkv"] == before + 1
    folded = fast.folded_quant_conv(vae.encoder.conv_out, vae.quant_conv)
    assert fast.folded_quant_conv(vae.encoder.conv_out, vae.quant_conv)[0] is folded[0]


def test_ops_know_no_module_types():
    """The code of ops.py (not its prose) names no module class and reads no module attribute."""
    import ast

    tree = ast.parse((ROOT / "sdvae_fast" / "ops.py").read_text())
    used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    used |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    module_words = {"Module", "GroupNorm", "Linear", "Conv2d", "to_q", "to_k", "to_v", "to_out", "heads", "norm1",
                    "conv1", "resnets", "group_norm_module", "named_modules"}
    assert not used & module_words, sorted(used & module_words)


def test_package_modules_import_each_other_in_no_circle():
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("draw_structure", ROOT / "tools" / "draw_structure.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["draw_structure"] = module
    spec.loader.exec_module(module)
    edges = module.import_edges()
    circles = sorted((a, b) for a, b in edges if (b, a) in edges and a < b)
    assert not circles, f"modules that import each other: {circles}"


def test_no_file_cites_a_folder_outside_the_repository():
    pattern = re.compile(r"\.\./shared|shared/DESIGN|(?<![\w/])DESIGN\.md")
    offenders = []
    for path in [*ROOT.glob("sdvae_fast/**/*.py"), *ROOT.glob("kernels/*.py"), *ROOT.glob("bench/*"),
                 *ROOT.glob("tests/*.py"), *ROOT.glob("docs/**/*.md"), ROOT / "README.md"]:
        if path.is_file() and path.name != "test_registry.py":
            text = path.read_text(encoding="utf-8", errors="replace")
            offenders += [f"{path.relative_to(ROOT)}:{text[:m.start()].count(chr(10)) + 1}"
                          for m in pattern.finditer(text)]
    assert not offenders, offenders


def test_kernel_dtypes_and_backend_names_have_one_owner():
    from sdvae_fast import backends, model, patching
    from sdvae_fast.kernels import _common, attention, conv, group_norm

    assert ops._KERNEL_DTYPES is _common.SUPPORTED_DTYPES
    for module in (attention, conv, group_norm):
        dtypes = getattr(module, "SUPPORTED_DTYPES", _common.SUPPORTED_DTYPES)
        assert dtypes is _common.SUPPORTED_DTYPES, module.__name__
    assert model.check_backend is backends.check_backend and fast.VALID_BACKENDS is backends.BACKENDS
    assert patching.check_backend is backends.check_backend


def test_a_block_registration_that_leaves_out_a_child_falls_back_and_names_it():
    model = golden.make_vae()
    block = model.decoder.up_blocks[0]
    block.__class__ = type("MyUpBlock", (type(block),), {})
    try:
        fast.register_block("MyUpBlock")(lambda b: [(f"resnets.{i}", r) for i, r in enumerate(b.resnets)])
        assert dict(fast.unsupported_units(model)) == {
            "decoder.up_blocks.0": "the children registered for class MyUpBlock leave out ['upsamplers.0']"}
    finally:
        units.BLOCK_TYPES.pop("MyUpBlock", None)
