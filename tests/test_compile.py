"""`torch.compile(..., dynamic=True)` over the user path: encode + latent_dist.sample() (no generator, one
torch.Generator, a list of them) / mode(), and decode (issue 15, item A).

The compiled functions run with a counting Dynamo backend (`torch._dynamo.testing.CompileCounter`: Dynamo's full
trace with fake tensors and symbolic sizes, where the failure of issue 15 was, then the captured FX graph run
as is). That makes compiled and eager results bitwise comparable (the same aten ops in the same order) and keeps
the test to seconds. Inductor is not used here: on this CPU it takes about 50 s to compile one encode, and
`aot_eager` fails on CPU for plain diffusers too (`native_group_norm` rejects the channels_last tensor the
attention processor hands it: "Expected X.is_contiguous(memory_format)"), a PyTorch/diffusers matter outside
this package. The slow-marked test at the end runs inductor once.

Policy under test (sdvae_fast.reference.randn_like_diffusers): without a generator the draw is traced (no graph
break at all, `fullgraph=True`); with a generator or a list of generators there is exactly one graph break, at
the eager noise draw `_randn_with_generators`, and the numbers are bitwise diffusers'. Sizes are chosen so that
Dynamo's duck sizing gives H and W their own symbols from the first call (H != W, neither equal to a batch or
channel count), so later sizes reuse the graph instead of recompiling.
"""
import time

import pytest
import torch
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend
from torch._dynamo.utils import counters

from sdvae_fast import AutoencoderKL

# (H, W) of the images: H != W and no side equal to the batch (2) or a channel count (3, 4, 8).
IMAGE_SIZES = ((10, 14), (12, 18), (16, 6))
# (h, w) of the latents, same rule.
LATENT_SIZES = ((5, 7), (6, 9), (10, 5))


@pytest.fixture
def dynamo():
    """A clean Dynamo state (caches and counters) before and after the test."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    counters.clear()


def _vae(backend: str) -> AutoencoderKL:
    vae = AutoencoderKL.from_preset("diffusers_test", seed=0).eval().requires_grad_(False)
    vae.set_backend(backend)
    return vae


def _graph_breaks() -> dict:
    """{reason: count} of every graph break Dynamo recorded since the last reset."""
    return dict(counters["graph_break"])


def _only_breaks_at_random_draw(breaks: dict) -> None:
    """Every recorded graph break is the call of the eager noise draw (torch.compiler.disable'd)."""
    for reason in breaks:
        assert "_randn_with_generators" in reason, f"unexpected graph break: {reason}"


def _images(size, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((2, 3) + tuple(size), generator=g) * 2 - 1


def _frames(compiled: dict) -> dict:
    return {name: counter.frame_count for name, counter in compiled.items()}


def test_compiled_sample_mode_and_decode_without_graph_breaks(dynamo):
    """encode + sample() (no generator) + mode(), and decode: one graph each (fullgraph=True), reused for three
    sizes, bitwise the eager results (sample() after the same torch.manual_seed)."""
    start = time.perf_counter()
    vae = _vae("torch")
    counts = {"encode": CompileCounter(), "decode": CompileCounter()}

    def encode(x):
        dist = vae.encode(x).latent_dist
        return dist.sample(), dist.mode()

    encode_c = torch.compile(encode, dynamic=True, fullgraph=True, backend=counts["encode"])
    decode_c = torch.compile(lambda z: vae.decode(z).sample, dynamic=True, fullgraph=True, backend=counts["decode"])
    with torch.no_grad():
        for i, size in enumerate(IMAGE_SIZES):
            x = _images(size, seed=i)
            torch.manual_seed(100 + i)
            got_sample, got_mode = encode_c(x)
            torch.manual_seed(100 + i)
            dist = vae.encode(x).latent_dist
            assert torch.equal(got_sample, dist.sample()), "compiled sample() differs from eager (same seed)"
            assert torch.equal(got_mode, dist.mode())
            assert got_sample.shape == (2, 4, size[0] // 2, size[1] // 2)
            z = torch.randn((2, 4) + LATENT_SIZES[i], generator=torch.Generator().manual_seed(50 + i))
            got = decode_c(z)
            assert torch.equal(got, vae.decode(z).sample)
            assert got.shape == (2, 3, 2 * LATENT_SIZES[i][0], 2 * LATENT_SIZES[i][1])
            if i == 0:
                first = _frames(counts)
    breaks = _graph_breaks()
    print(f"frames after the first size {first}, after {len(IMAGE_SIZES)} sizes {_frames(counts)}; "
          f"unique_graphs={counters['stats']['unique_graphs']}; graph breaks {sum(breaks.values())}; "
          f"{time.perf_counter() - start:.1f} s")
    assert first == {"encode": 1, "decode": 1}
    assert _frames(counts) == first, "a new input size recompiled instead of reusing the dynamic graph"
    assert not breaks


def test_compiled_sample_with_generators_breaks_only_at_the_draw(dynamo):
    """encode + sample(generator) with one torch.Generator and with a list of generators (one per sample): the
    only graph break is the eager draw, three sizes reuse the compiled frames, and the numbers are bitwise the
    eager ones and diffusers' DiagonalGaussianDistribution's for the same generator state."""
    start = time.perf_counter()
    vae = _vae("torch")
    counts = {"generator": CompileCounter(), "list": CompileCounter()}
    with_gen = torch.compile(lambda x, g: vae.encode(x).latent_dist.sample(generator=g), dynamic=True,
                             backend=counts["generator"])
    with_list = torch.compile(lambda x, gs: vae.encode(x).latent_dist.sample(generator=gs), dynamic=True,
                              backend=counts["list"])
    try:
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution as TheirDist
    except ImportError:
        TheirDist = None
    with torch.no_grad():
        for i, size in enumerate(IMAGE_SIZES):
            x = _images(size, seed=i)
            dist = vae.encode(x).latent_dist
            got = with_gen(x, torch.Generator().manual_seed(7 + i))
            assert torch.equal(got, dist.sample(generator=torch.Generator().manual_seed(7 + i)))
            if TheirDist is not None:
                assert torch.equal(got, TheirDist(dist.parameters).sample(torch.Generator().manual_seed(7 + i)))
            seeds = (11 + i, 12 + i)
            got = with_list(x, [torch.Generator().manual_seed(s) for s in seeds])
            assert torch.equal(got, dist.sample(generator=[torch.Generator().manual_seed(s) for s in seeds]))
            if TheirDist is not None:
                theirs = TheirDist(dist.parameters).sample([torch.Generator().manual_seed(s) for s in seeds])
                assert torch.equal(got, theirs)
            if i == 0:
                first = _frames(counts)
    breaks = _graph_breaks()
    print(f"frames after the first size {first}, after {len(IMAGE_SIZES)} sizes {_frames(counts)}; "
          f"unique_graphs={counters['stats']['unique_graphs']}; graph breaks {breaks and sum(breaks.values())} "
          f"({'; '.join(r.splitlines()[0] for r in breaks)}); {time.perf_counter() - start:.1f} s")
    assert _frames(counts) == first, "a new input size recompiled instead of reusing the dynamic graph"
    assert breaks, "a generator draw cannot be traced: expected the graph break at _randn_with_generators"
    _only_breaks_at_random_draw(breaks)


def test_compiled_fast_path_interpreter(dynamo):
    """backend="triton" (the kernels under TRITON_INTERPRET=1): the registered ops trace through their fake
    implementations; encode + sample(generator) and decode compile with dynamic sizes, the decode without any
    graph break, and give the eager numbers. Two encode sizes and two decode sizes prove the graphs are reused.
    The decode runs through AOT autograd (`aot_eager`), which traces the ops' fake implementations as inductor
    would, then runs the kernels."""
    start = time.perf_counter()
    vae = _vae("triton")
    c_enc, c_dec = CompileCounter(), CompileCounterWithBackend("aot_eager")
    encode = torch.compile(lambda x, g: vae.encode(x).latent_dist.sample(generator=g), dynamic=True,
                           backend=c_enc)
    decode = torch.compile(lambda z: vae.decode(z).sample, dynamic=True, fullgraph=True, backend=c_dec)
    with torch.no_grad():
        x = torch.rand(1, 3, 6, 10, generator=torch.Generator().manual_seed(0)) * 2 - 1
        got = encode(x, torch.Generator().manual_seed(3))
        want = vae.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(3))
        assert torch.equal(got, want)
        frames = c_enc.frame_count
        x2 = torch.rand(1, 3, 10, 6, generator=torch.Generator().manual_seed(1)) * 2 - 1
        assert encode(x2, torch.Generator().manual_seed(3)).shape == (1, 4, 5, 3)
        assert c_enc.frame_count == frames, "the second size recompiled"
        frames = []
        for seed, shape in enumerate((1, 4, *hw) for hw in LATENT_SIZES[:2]):
            z = torch.randn(*shape, generator=torch.Generator().manual_seed(seed + 2))
            assert torch.equal(decode(z), vae.decode(z).sample), f"compiled decode {shape}"
            frames.append(c_dec.frame_count)
        assert frames[1] == frames[0], f"the second decode size recompiled ({frames})"
    breaks = _graph_breaks()
    print(f"fast path: encode frames {c_enc.frame_count}, decode frames {c_dec.frame_count}, graph breaks "
          f"{sum(breaks.values())}; {time.perf_counter() - start:.1f} s")
    _only_breaks_at_random_draw(breaks)


@pytest.mark.slow
def test_inductor_encode_sample_dynamic(dynamo):
    """The default backend (inductor) over encode + sample(generator) at two sizes: runs, reuses its graphs,
    and matches eager within fp32 rounding (inductor fuses differently, so not bitwise)."""
    from tests.helpers import assert_close

    vae = _vae("torch")
    fn = torch.compile(lambda x, g: vae.encode(x).latent_dist.sample(generator=g), dynamic=True)
    with torch.no_grad():
        for i, size in enumerate(IMAGE_SIZES[:2]):
            x = _images(size, seed=i)
            got = fn(x, torch.Generator().manual_seed(i))
            want = vae.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(i))
            assert_close(got, want, rel_l2=1e-5, name=f"inductor sample {size}")
            if i == 0:
                graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs, "the second size recompiled"
    _only_breaks_at_random_draw(_graph_breaks())
