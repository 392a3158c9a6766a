"""The per-rank body of tests/test_patch_parallel.py, in its own module so that a spawned process can choose
TRITON_INTERPRET before anything imports sdvae_fast (Triton reads it when kernels are defined)."""
import copy
import datetime
import os

# Full depth (the SD VAE's four levels, three up- and downsamples), narrow widths: the PyTorch-ops runs.
CONFIG = dict(block_out_channels=(16, 32, 32, 32), norm_num_groups=8, layers_per_block=1, latent_channels=4)
LATENT_SHAPE = (2, 4, 5, 3)  # batch 2; 5 rows: bands of unequal height for 2, 3 and 4 ranks
IMAGE_SHAPE = (2, 3, 43, 20)  # 43 rows: 5 at the deepest level and 3 remainder rows for the last rank
# Two levels for the runs on the Triton kernels under the interpreter (half the kernel launches of four).
SMALL_CONFIG = dict(block_out_channels=(32, 64), norm_num_groups=8, layers_per_block=1, latent_channels=4,
                    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
SMALL_LATENT_SHAPE = (1, 4, 3, 3)  # 3 rows, bands (2, 1) and (1, 1, 1)
SMALL_IMAGE_SHAPE = (1, 3, 7, 6)  # 3 rows at the deepest level and a remainder row
INJECTED = "injected failure in the middle of a stage"


def make_vae(config=CONFIG):
    """A narrow VAE (every unit type, mid-block attention included) with seeded weights, fp32, eval mode."""
    from sdvae_fast import AutoencoderKL

    return AutoencoderKL.from_preset("sd15", seed=0, **config).requires_grad_(False)


def latents(seed: int = 1, shape=LATENT_SHAPE):
    import torch

    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) + 0.3


def images(seed: int = 2, shape=IMAGE_SHAPE):
    import torch

    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def overflow_latents():
    """fp16 latents whose last band (only) overflows fp16 in the first stage: every rank must recompute."""
    import torch

    z = latents().half()
    z[:, :, -1] = 3e4
    return z


def _join(rank: int, world: int, port: int, interpret: bool):
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))


def _errors(rank: int, world: int, vae, z) -> dict:
    """What every rank raised for the bad inputs (each must raise the same on every rank)."""
    import torch.nn as nn

    from sdvae_fast.parallel import decode_patch_parallel

    gelu = copy.deepcopy(vae)
    gelu.decoder.conv_act = nn.GELU()  # the output unit falls back to module forwards: not split by rows
    cases = (("different_input", vae, latents(seed=rank + 10)),
             ("one_rank_wrong", vae, z.double() if rank == world - 1 else z),
             ("fallback_unit", gelu, z))
    errors = {}
    for case, model, z_case in cases:
        try:
            decode_patch_parallel(model, z_case)
        except (ValueError, RuntimeError) as e:
            errors[case] = f"{type(e).__name__}: {e}"
    return errors


def _api_errors(rank: int, world: int, vae, z) -> dict:
    """Through `vae.decode` with patch parallelism on: latents of the wrong channel count on the last rank only
    (the model's own validation, agreed across ranks), and tiling turned on again."""
    errors = {}
    try:
        vae.decode(z[:, :3] if rank == world - 1 else z)
    except ValueError as e:
        errors["wrong_channels"] = f"{type(e).__name__}: {e}"
    vae.enable_tiling()
    try:
        vae.decode(z)
    except ValueError as e:
        errors["tiling"] = f"{type(e).__name__}: {e}"
    vae.disable_tiling()
    return errors


def _mid_stage_failure(rank: int, world: int, vae, z) -> str:
    """The last rank raises inside its up block's upsample conv, after the halo exchange, while the others go on
    to the next collectives: every rank must raise the same error (the group is out of step afterwards)."""
    from sdvae_fast import ops, parallel

    parallel.TIMEOUT_S = 60.0
    if rank == world - 1:
        def broken(*args, **kwargs):
            raise RuntimeError(INJECTED)

        ops.upsample_conv2d = broken
    try:
        parallel.decode_patch_parallel(vae, z)
    except parallel.PatchParallelError as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def worker(rank: int, world: int, port: int, folder: str, interpret: bool) -> None:
    """Join a gloo group of `world` ranks and run every case, saving what each rank got to `folder`."""
    _join(rank, world, port, interpret)
    import torch

    import sdvae_fast
    from sdvae_fast import fast
    from sdvae_fast.parallel import decode_patch_parallel, encode_patch_parallel

    vae = make_vae()
    z = latents()
    results = {"full": decode_patch_parallel(vae, z)}
    band, start = decode_patch_parallel(vae, z, gather=False)
    results.update(band=band, start=torch.tensor(start))
    results["moments"] = encode_patch_parallel(vae, images())
    fast.EMIT_GN_STATS = False  # every GroupNorm's partials computed from its input instead of emitted
    results["full_not_emitted"] = decode_patch_parallel(vae, z)
    fast.EMIT_GN_STATS = True
    results["bf16"] = decode_patch_parallel(copy.deepcopy(vae).to(torch.bfloat16), z.to(torch.bfloat16)).float()
    vae16 = copy.deepcopy(vae).half()
    results["fp16"] = decode_patch_parallel(vae16, z.half()).float()
    results["fp16_overflow"] = decode_patch_parallel(vae16, overflow_latents()).float()

    sdvae_fast.enable_patch_parallel(vae)  # the user path: encode / decode / sample() on the model
    posterior = vae.encode(images()).latent_dist
    # The same values in another memory format on one rank are the same input.
    z_api = z.contiguous(memory_format=torch.channels_last) if rank == 1 else z
    results.update(api_decode=vae.decode(z_api).sample, api_mean=posterior.mean, api_sample=posterior.sample())
    api_errors = _api_errors(rank, world, vae, z)
    sdvae_fast.disable_patch_parallel(vae)

    import diffusers  # a live diffusers VAE with the same weights: patched by enable, unpatched by disable

    live = diffusers.AutoencoderKL.from_config(vae.config).requires_grad_(False)
    live.load_state_dict(vae.state_dict())
    sdvae_fast.enable_patch_parallel(live, gather=False)
    results.update(live_band=live.decode(z).sample, live_offset=torch.tensor(live.patch_parallel_offset))
    sdvae_fast.disable_patch_parallel(live)
    sdvae_fast.enable_patch_parallel(live)
    posterior = live.encode(images()).latent_dist
    results.update(live_decode=live.decode(z).sample, live_mean=posterior.mean, live_sample=posterior.sample())
    live_errors = _api_errors(rank, world, live, z)
    sdvae_fast.disable_patch_parallel(live)
    results["live_unpatched"] = not sdvae_fast.is_patched(live) and "encode" not in live.__dict__

    results["errors"] = _errors(rank, world, vae, z)
    results["errors"].update({f"api_{k}": v for k, v in api_errors.items()})
    results["errors"].update({f"live_{k}": v for k, v in live_errors.items()})
    results["errors"]["mid_stage"] = _mid_stage_failure(rank, world, vae, z)
    torch.save(results, os.path.join(folder, f"rank{rank}.pt"))
    # The failed call left the group's collectives out of step: leave without destroy_process_group.


def interpreter_worker(rank: int, world: int, port: int, folder: str, interpret: bool) -> None:
    """The Triton kernels under the interpreter on every rank: decode and encode of the small shapes (fp32)."""
    _join(rank, world, port, interpret)
    import torch
    import torch.distributed as dist

    from sdvae_fast.parallel import decode_patch_parallel, encode_patch_parallel

    vae = make_vae(SMALL_CONFIG)
    results = {"full": decode_patch_parallel(vae, latents(shape=SMALL_LATENT_SHAPE)),
               "moments": encode_patch_parallel(vae, images(shape=SMALL_IMAGE_SHAPE))}
    torch.save(results, os.path.join(folder, f"rank{rank}.pt"))
    dist.destroy_process_group()
