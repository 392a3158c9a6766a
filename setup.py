"""Packaging for sdvae-fast.

`kernels/` is installed as the subpackage `sdvae_fast.kernels` through `package_dir`; there is never a
top-level `kernels` module (Hugging Face's `kernels` package, which diffusers imports, owns that name).
"""
from setuptools import setup

setup(
    name="sdvae-fast",
    version="0.1.0",
    description="Triton kernels and a drop-in AutoencoderKL for the Stable Diffusion VAE",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=["sdvae_fast", "sdvae_fast.fast", "sdvae_fast.kernels"],
    package_dir={"sdvae_fast": "sdvae_fast", "sdvae_fast.kernels": "kernels"},
    package_data={"sdvae_fast": ["data/*", "data/*/*"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "triton>=3.6",
        "numpy",
        "safetensors",
        "Pillow",
        "tqdm",
        "scikit-image",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "diffusers==0.42.1", "scikit-image"],
        "bench": ["pytest-benchmark", "diffusers==0.42.1", "matplotlib", "rich"],
    },
    entry_points={"console_scripts": ["sdvae-fast=sdvae_fast.cli:main"]},
)
