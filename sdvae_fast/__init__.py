"""sdvae-fast: Triton kernels and a drop-in diffusers `AutoencoderKL` for the Stable Diffusion VAE."""
