"""The per-rank body of tests/test_patch_parallel.py, in its own module so that a spawned process can choose
TRITON_INTERPRET before anything imports sdvae_fast (Triton reads it when kernels are defined)."""
import copy
import datetime
import os

CONFIG = dict(block_out_channels=(32, 64), norm_num_groups=8, layers_per_block=1, latent_channels=4,
              down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
LATENT_SHAPE = (2, 4, 5, 3)  # batch 2; 5 rows: bands of unequal height for 2, 3 and 4 ranks
IMAGE_SHAPE = (2, 3, 11, 6)  # 11 rows: 5 at the deepest level and a remainder row for the last rank


def make_vae():
    """The narrow two-level VAE (every unit type once) with seeded weights, fp32, eval mode."""
    from sdvae_fast import AutoencoderKL

    return AutoencoderKL.from_preset("sd15", seed=0, **CONFIG).requires_grad_(False)


def latents(seed: int = 1):
    import torch

    return torch.randn(*LATENT_SHAPE, generator=torch.Generator().manual_seed(seed)) + 0.3


def images(seed: int = 2):
    import torch

    return torch.rand(*IMAGE_SHAPE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def worker(rank: int, world: int, port: int, folder: str, interpret: bool) -> None:
    """Join a gloo group of `world` ranks and run every case, saving what each rank got to `folder`."""
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    from sdvae_fast.parallel import decode_patch_parallel, encode_patch_parallel

    vae = make_vae()
    z = latents()
    results = {"full": decode_patch_parallel(vae, z)}
    band, start = decode_patch_parallel(vae, z, gather=False)
    results.update(band=band, start=torch.tensor(start))
    results["moments"] = encode_patch_parallel(vae, images())
    results["bf16"] = decode_patch_parallel(copy.deepcopy(vae).to(torch.bfloat16), z.to(torch.bfloat16)).float()
    import sdvae_fast

    sdvae_fast.enable_patch_parallel(vae)  # the user path: encode / decode / sample() on the model
    posterior = vae.encode(images()).latent_dist
    results.update(api_decode=vae.decode(z).sample, api_mean=posterior.mean, api_sample=posterior.sample())
    sdvae_fast.disable_patch_parallel(vae)
    errors = {}
    cases = (("different_input", vae, latents(seed=rank + 10)), ("fp16", copy.deepcopy(vae).half(), z.half()),
             ("one_rank_wrong", vae, z.double() if rank == world - 1 else z))
    for case, model, z_case in cases:
        try:
            decode_patch_parallel(model, z_case)
        except (ValueError, RuntimeError) as e:
            errors[case] = f"{type(e).__name__}: {e}"
    results["errors"] = errors
    torch.save(results, os.path.join(folder, f"rank{rank}.pt"))
    dist.destroy_process_group()
