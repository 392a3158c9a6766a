"""The diffusers contract (issue: a true drop-in): pipelines, saving, loading, Hub ids, shards, the API diffusers
users reach for, on `sdvae_fast.AutoencoderKL` (a diffusers subclass here) and on `StandaloneAutoencoderKL` (what
users without diffusers get). CPU, torch backend, the tiny `diffusers_test` architecture: seconds per test.
"""
import importlib.util
import inspect
import json
import logging
import subprocess
import sys

import pytest
import torch

from sdvae_fast import AutoencoderKL, DecoderOutput, StandaloneAutoencoderKL, patch

diffusers = pytest.importorskip("diffusers", reason="the contract is diffusers'; without it see test_model.py")

HAS_ACCELERATE = importlib.util.find_spec("accelerate") is not None
BOTH = pytest.mark.parametrize("cls", [AutoencoderKL, StandaloneAutoencoderKL], ids=["subclass", "standalone"])


def _vae(cls=AutoencoderKL, seed=0):
    return cls.from_preset("diffusers_test", seed=seed)


def _images(n=2, h=32, w=24, seed=1):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


# -- the class itself ------------------------------------------------------------------------------------------


def test_with_diffusers_installed_our_class_is_a_diffusers_autoencoder_and_its_torch_backend_is_diffusers_forward():
    ours = _vae()
    theirs = diffusers.AutoencoderKL.from_config(ours.config).eval()
    theirs.load_state_dict(ours.state_dict())
    assert isinstance(ours, diffusers.AutoencoderKL) and ours.backend == "auto"
    x = _images()
    with torch.no_grad():
        assert torch.equal(ours(x).sample, theirs(x).sample)
    out = ours.decode(torch.randn(1, 4, 3, 2))
    assert DecoderOutput is diffusers.models.autoencoders.vae.DecoderOutput and isinstance(out, DecoderOutput)
    assert list(out.keys()) == ["sample"] and list(out.values())[0] is out.sample


@BOTH
def test_constructor_signature_is_diffusers_and_from_config_round_trips_both_ways(cls):
    ours_params = inspect.signature(cls.__init__).parameters
    theirs_params = inspect.signature(diffusers.AutoencoderKL.__init__).parameters
    assert [(p.name, p.default) for p in ours_params.values()] == [(p.name, p.default) for p in theirs_params.values()]
    ours = cls.from_config("diffusers_test", scaling_factor=0.5)
    theirs = diffusers.AutoencoderKL.from_config(ours.config)
    back = cls.from_config(theirs.config)
    assert theirs.config.scaling_factor == back.config.scaling_factor == 0.5
    assert list(theirs.state_dict()) == list(ours.state_dict()) == list(back.state_dict())
    with pytest.raises(TypeError, match=r"unknown AutoencoderKL config field.*'bogus'"):
        cls(bogus=1)


def test_standalone_gradient_checkpointing_gives_the_same_gradients_and_marks_diffusers_block_types():
    model = _vae(StandaloneAutoencoderKL).train()
    x = _images()

    def grads():
        model.zero_grad()
        model(x).sample.square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.enable_gradient_checkpointing()
    assert model.is_gradient_checkpointing
    marked = {type(m).__name__ for m in model.modules() if getattr(m, "gradient_checkpointing", False)}
    assert marked == {"Encoder", "Decoder", "UNetMidBlock2D"}
    assert all(torch.equal(a, b) for a, b in zip(plain, grads()))
    model.disable_gradient_checkpointing()
    assert not model.is_gradient_checkpointing


@pytest.mark.parametrize("feature", ["enable_layerwise_casting", "enable_group_offload", "set_attn_processor",
                                     "set_default_attn_processor", "fuse_qkv_projections"])
def test_standalone_class_raises_import_error_naming_diffusers_for_diffusers_only_features(feature):
    with pytest.raises(ImportError, match="diffusers"):
        getattr(_vae(StandaloneAutoencoderKL), feature)()


def test_diffusers_features_work_on_our_class():
    vae = _vae()
    assert isinstance(vae.config, diffusers.configuration_utils.FrozenDict)
    vae.set_default_attn_processor()
    assert len(vae.attn_processors) == 2
    z = torch.randn(1, 4, 3, 2)
    with torch.no_grad():
        before = vae.decode(z).sample
        vae.fuse_qkv_projections()
        fused = vae.decode(z).sample
        vae.unfuse_qkv_projections()
    assert (fused - before).abs().max() < 1e-5
    vae.enable_gradient_checkpointing()
    assert vae.is_gradient_checkpointing
    assert vae.num_parameters() == sum(p.numel() for p in vae.parameters())
    vae.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    with torch.no_grad():
        out = vae.decode(torch.randn(1, 4, 3, 2)).sample
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_patch_of_our_own_class_only_sets_the_backend():
    vae = _vae()
    assert patch(vae, backend="torch") is vae and vae.backend == "torch"
    assert "forward" not in vae.encoder.__dict__ and "_encode" not in vae.__dict__


# -- pipelines ---------------------------------------------------------------------------------------------------


def _dit_pipeline(vae):
    transformer = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=8, num_layers=1, sample_size=4,
        patch_size=2, num_embeds_ada_norm=4, norm_num_groups=2)
    return diffusers.DiTPipeline(transformer=transformer, vae=vae, scheduler=diffusers.DDIMScheduler())


def test_pipeline_with_our_vae_saves_a_folder_that_diffusers_alone_loads_and_ours_on_request(tmp_path):
    vae = _vae()
    pipe = _dit_pipeline(vae)
    assert pipe.vae is vae
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert json.loads((tmp_path / "vae" / "config.json").read_text())["_class_name"] == "AutoencoderKL"

    # diffusers alone: a fresh interpreter in which sdvae_fast cannot be imported.
    code = ("import sys; sys.modules['sdvae_fast'] = None\n"
            "import diffusers, torch\n"
            f"pipe = diffusers.DiffusionPipeline.from_pretrained({str(tmp_path)!r})\n"
            "assert type(pipe.vae) is diffusers.AutoencoderKL, type(pipe.vae)\n"
            "print(float(sum(p.double().sum() for p in pipe.vae.parameters())))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1]) == pytest.approx(
        float(sum(p.detach().double().sum() for p in vae.parameters())), rel=1e-12)

    ours = AutoencoderKL.from_pretrained(tmp_path, subfolder="vae")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    library_logger = logging.getLogger("diffusers")  # diffusers' loggers do not propagate to the root logger
    library_logger.addHandler(handler)
    try:
        reloaded = diffusers.DiffusionPipeline.from_pretrained(tmp_path, vae=ours)
    finally:
        library_logger.removeHandler(handler)
    assert reloaded.vae is ours and type(ours) is AutoencoderKL and _same_weights(ours, vae)
    assert not [r for r in records if "Expected types" in r.getMessage()], [r.getMessage() for r in records]


# -- loading and saving --------------------------------------------------------------------------------------------


def _fake_hub_cache(root, repo="sdvae-test/tiny-vae", commit="0123456789abcdef0123456789abcdef01234567"):
    """A Hugging Face cache folder holding one model repository with the VAE in vae/ (huggingface_hub's layout:
    models--org--name/refs/main names the commit, snapshots/<commit>/ holds the files)."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    vae = _vae(seed=3)
    vae.save_pretrained(repo_dir / "snapshots" / commit / "vae")
    return repo, vae


@BOTH
def test_hub_id_loads_from_a_local_cache_with_local_files_only_and_says_so_in_one_line_when_absent(cls, tmp_path):
    repo, saved = _fake_hub_cache(tmp_path)
    model = cls.from_pretrained(repo, subfolder="vae", cache_dir=tmp_path, local_files_only=True)
    assert type(model) is cls and _same_weights(model, saved)
    with pytest.raises(OSError) as info:
        cls.from_pretrained("sdvae-test/absent", subfolder="vae", cache_dir=tmp_path, local_files_only=True)
    assert "sdvae-test/absent" in str(info.value)


@BOTH
def test_from_pretrained_takes_diffusers_keyword_arguments(cls, tmp_path):
    saved = _vae(seed=4)
    saved.save_pretrained(tmp_path)
    # diffusers' device_map needs accelerate (its own error says so); the standalone loader needs nothing more.
    placement = {"device_map": "cpu"} if cls is StandaloneAutoencoderKL or HAS_ACCELERATE else {}
    model, info = cls.from_pretrained(tmp_path, use_safetensors=True, local_files_only=True, cache_dir=None,
                                      revision=None, low_cpu_mem_usage=True, dtype=torch.float16,
                                      output_loading_info=True, **placement)
    assert model.dtype == torch.float16 and not model.training
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    loaded, want = model.state_dict(), saved.state_dict()
    assert list(loaded) == list(want) and all(torch.equal(loaded[k], want[k].half()) for k in want)


@BOTH
@pytest.mark.parametrize("variant", [None, "fp16"])
def test_sharded_checkpoints_save_and_load_across_both_libraries(cls, variant, tmp_path):
    ours = _vae(cls, seed=5)
    ours.save_pretrained(tmp_path / "ours", max_shard_size="2KB", variant=variant)
    index = "diffusion_pytorch_model.safetensors.index.json" if variant is None else \
        "diffusion_pytorch_model.safetensors.index.fp16.json"
    assert (tmp_path / "ours" / index).is_file()
    assert len(list((tmp_path / "ours").glob("diffusion_pytorch_model*-of-*.safetensors"))) > 1
    theirs = diffusers.AutoencoderKL.from_pretrained(tmp_path / "ours", variant=variant)
    assert _same_weights(theirs, ours)
    theirs.save_pretrained(tmp_path / "theirs", max_shard_size="2KB", variant=variant)
    assert _same_weights(cls.from_pretrained(tmp_path / "theirs", variant=variant), ours)


@BOTH
def test_variant_only_folder_raises_os_error_naming_the_variant(cls, tmp_path):
    _vae(cls).save_pretrained(tmp_path, variant="fp16")
    with pytest.raises(OSError, match="fp16|variant"):
        cls.from_pretrained(tmp_path)
    assert type(cls.from_pretrained(tmp_path, variant="fp16")) is cls


# -- what a new user hit (issue 15's trial) ---------------------------------------------------------------------


def test_posterior_is_also_diffusers_distribution_and_integer_latents_get_a_latents_hint():
    vae = _vae()
    assert isinstance(vae.encode(_images()).latent_dist, diffusers.models.autoencoders.vae.DiagonalGaussianDistribution)
    with pytest.raises(TypeError, match="z must be a floating-point tensor.*pass float latents"):
        vae.decode(torch.zeros(1, 4, 2, 2, dtype=torch.int64))


@BOTH
def test_a_local_folder_named_tiny_wins_over_the_bundled_tiny(cls, tmp_path, monkeypatch):
    _vae(cls).save_pretrained(tmp_path / "tiny")
    monkeypatch.chdir(tmp_path)
    assert list(cls.from_pretrained("tiny").config.block_out_channels) == [2, 4]


@pytest.mark.parametrize("device_map, message", [
    ("auto", "splits the model"), ({"encoder": "cpu"}, "per-module map"), ("gpu0", "is not a device")])
def test_standalone_device_map_errors_say_what_was_expected(device_map, message, tmp_path):
    _vae(StandaloneAutoencoderKL).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        StandaloneAutoencoderKL.from_pretrained(tmp_path, device_map=device_map)
    with pytest.raises(ValueError, match="ignore_mismatched_sizes"):
        StandaloneAutoencoderKL.from_pretrained(tmp_path, ignore_mismatched_sizes=True)
    assert StandaloneAutoencoderKL.from_pretrained(tmp_path, device_map={"": "cpu"}).device.type == "cpu"


def test_is_patched_is_true_for_our_class_which_has_the_fast_path_built_in():
    from sdvae_fast import is_patched, unpatch

    vae = _vae()
    assert is_patched(vae) and unpatch(vae) is vae and is_patched(vae)
