"""`python -m sdvae_fast ...`: the `sdvae-fast` command line (`sdvae_fast.cli`).

Under torchrun, `decode` and `reconstruct` split every image by rows over the processes it starts
(`torchrun --nproc-per-node N -m sdvae_fast decode LATENTS --out DIR`): NCCL with one GPU per process
(LOCAL_RANK) on CUDA, gloo on CPU; rank 0 writes the files and prints.
"""
import sys

from sdvae_fast.cli import main

if __name__ == "__main__":
    sys.exit(main())
