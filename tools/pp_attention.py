"""The mid-block attention under patch parallelism, three ways, measured on a gloo process group on the CPU.

Under patch parallelism (sdvae_fast.parallel) each rank holds a band of rows of the latent-resolution feature map
(N, C, h_band, w). The VAE mid-block attention (one head of dim C = 512, tokens = h*w) needs every token's keys and
values. Issue 12 asks whether to all-gather K and V or to pass K/V blocks around a ring, measured. This script runs,
on the same weights and the same input, three strategies for one attention unit (GroupNorm, q/k/v projection,
softmax(q k^T * scale) v, out projection + residual) and each rank's output band:

  A "gather map": all-gather the bands into the whole map on every rank, `vae_attention_block(full, attn)` on it,
    keep this rank's rows (the project's design before the K/V gather: every rank computes the whole attention);
  B "gather K/V": the design in sdvae_fast.parallel today: GroupNorm statistics merged across ranks (band partials,
    all-gathered, Chan's merge in rank order), `vae_attention_block(band, attn, stats=..., gather_kv=...)` with a
    gather of every band's keys and values built on `dist.all_gather` (bands padded to the largest, trimmed,
    concatenated in image order): this rank's queries attend to all tokens. Once per world size and map it is
    also run through the real `RowParallelHooks` (merge_stats, gather_tokens) and must give the same bits;
  C "ring": merged statistics as in B, then this rank's q stays, its K/V block travels around the ring (world - 1
    steps of `batch_isend_irecv` to the next rank / from the previous one, the next block's transfer posted
    before the current block's compute), partial attentions merged with the online-softmax rule
    (`online_softmax_merge`), then the out projection + residual on the band.

For each world size and map: every strategy's whole output (the bands gathered after the run) is compared with one
process's `vae_attention_block(full_map, attn)` in fp32 (relative L2 ||a - b|| / ||b|| and max abs; also the relative
L2 of the attention branch y - x, which the residual does not dilute), and with the same call in fp64: a strategy
counts as exact to fp32 rounding when its branch is no further from the fp64 result than `--tolerance-factor` times
the fp32 single-process result's own distance (asserted; the script exits 1 otherwise). Then each strategy is timed:
`--warmup` runs, then `--repeats` runs, the strategies interleaved round by round, a barrier before each run, a
run's time being the slowest rank's wall time (all-reduce MAX after the run); the table shows the median and the
range. Per rank it also reports, computed from the tensors each strategy actually moves and allocates:
  - bytes received: for every collective (world - 1) x the bytes of one rank's (padded) part; for the ring
    (world - 1) x one (padded) K/V block; a rank's own part is not counted (it does not cross the wire);
  - bytes held for the attention (the largest tensors alive for it): A the whole map, B the keys and values of
    all tokens, C two K/V blocks (the one in use and the one arriving); and "with gather copies": the same plus the
    per-rank parts the all_gather wrote, alive while they are concatenated (none for the ring);
  - attention FLOPs: 4 * T_q * T_kv * C (q k^T and p v, 2 FLOPs per multiply-add), the largest band's rank.
The weights: `AutoencoderKL.from_preset(--preset, seed=--seed).decoder.mid_block.attentions[0]` (PyTorch's default
init, drawn deterministically), copied into `sdvae_fast.reference.Attention` (same parameter names and semantics,
the class every process builds); to_q's weight and bias are multiplied by `--q-gain` (default 4) on every path, so
the logits spread over several units per query and the softmax is far from uniform (with the preset's weights the
logits have a standard deviation of about 0.33: the running-max rescaling would hardly be exercised).

CPU times on a gloo group are not GPU numbers: the attention is PyTorch's SDPA (A, B) or plain matmuls (C) on one
thread per rank, and the collectives go through the loopback interface. What carries over to GPUs are the bytes,
the memory and the FLOPs (`analytic_row`), which the document also gives for a large image without running it.

Usage (writes the markdown to --out, prints it):
    python tools/pp_attention.py [--worlds 2 4] [--sizes 32 64] [--repeats 5] [--warmup 2] [--threads 1]
        [--q-gain 4] [--timeout 300] [--out docs/patch_parallel_attention.md] [--no-write]
Exit status: 0 when every world ran and every strategy was exact, 1 when a world failed or timed out, or (an
AssertionError, after the table is printed and written) a strategy was not exact; 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ("A gather map", "B gather K/V", "C ring")
DATE = "2026-12-03"
Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------------------------
# Set-up: weights, inputs, references, process bookkeeping
# ---------------------------------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0 and released), for the rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def git_commit() -> str:
    """`git rev-parse --short HEAD` of this checkout, plus " dirty" when `git status --porcelain` lists changes
    (anyone's, tracked or untracked); "unknown" when git fails."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + (" dirty" if status else "")


def attention_state(preset: str, seed: int, q_gain: float) -> dict:
    """The mid-block attention's weights and shape, as plain tensors that pickle into the spawned ranks.

    Builds `sdvae_fast.AutoencoderKL.from_preset(preset, seed=seed)` (fp32, CPU) and takes
    `decoder.mid_block.attentions[0]`; to_q's weight and bias are multiplied by `q_gain`.

    Returns:
        {"state": state_dict (fp32 CPU tensors, diffusers' names: group_norm.*, to_q.*, to_k.*, to_v.*,
        to_out.0.*), "config": keyword arguments of `sdvae_fast.reference.Attention`}.
    Raises:
        ValueError: an unknown preset (from_preset's message); RuntimeError: a model without a mid-block
        attention, or one that is not one head with a GroupNorm.
    """
    import sdvae_fast

    vae = sdvae_fast.AutoencoderKL.from_preset(preset, seed=seed, dtype=torch.float32)
    attentions = getattr(vae.decoder.mid_block, "attentions", None)
    attn = attentions[0] if attentions else None
    if attn is None or attn.group_norm is None:
        raise RuntimeError(f"preset {preset!r} has no mid-block attention with a GroupNorm")
    inner = attn.to_q.weight.shape[0]
    config = dict(query_dim=attn.to_q.weight.shape[1], heads=int(attn.heads), dim_head=inner // int(attn.heads),
                  num_groups=attn.group_norm.num_groups, eps=attn.group_norm.eps,
                  rescale_output_factor=float(attn.rescale_output_factor),
                  residual_connection=bool(attn.residual_connection))
    state = {k: v.detach().clone().float() for k, v in attn.state_dict().items()}
    state["to_q.weight"].mul_(q_gain)
    state["to_q.bias"].mul_(q_gain)
    return {"state": state, "config": config}


def build_attention(spec: dict, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """`sdvae_fast.reference.Attention(**spec["config"])` holding spec["state"] (strict load), eval mode, in
    `dtype` on the CPU. The same spec gives the same module in every process. Raises RuntimeError for a state
    dict that does not fit the config."""
    from sdvae_fast.reference import Attention

    attn = Attention(**spec["config"])
    attn.load_state_dict(spec["state"], strict=True)
    return attn.to(dtype).eval()


def make_input(size: int, channels: int, seed: int) -> Tensor:
    """The attention's input for a size x size latent map: (1, channels, size, size) fp32 standard normal from a
    generator seeded with seed + size (the same bits in every process)."""
    g = torch.Generator().manual_seed(seed + size)
    return torch.randn(1, channels, size, size, generator=g)


def rel_l2(a: Tensor, b: Tensor) -> float:
    """||a - b|| / ||b|| in fp64 (a and b of one shape, any float dtype); 0.0 when both are zero."""
    a, b = a.double(), b.double()
    den = b.norm().item()
    num = (a - b).norm().item()
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


# ---------------------------------------------------------------------------------------------------------------
# Communication with byte counting
# ---------------------------------------------------------------------------------------------------------------


class Comm:
    """Plain blocking collectives of the default process group that count what this rank receives and holds.

    Attributes (reset with `reset`):
        received: bytes this rank received since the reset: (world - 1) x the bytes of one part per all_gather
            (its own part is not counted), the receive buffers' bytes for point-to-point transfers.
        held: the largest number of bytes a strategy reported holding for the attention (`hold`).
        held_with_copies: the same including the all_gather parts alive while they are concatenated.
    """

    def __init__(self):
        """Counters for this rank of the default process group (initialised before). Raises RuntimeError (from
        torch.distributed) when there is none."""
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.reset()

    def reset(self) -> None:
        """Zero the counters."""
        self.received = self.held = self.held_with_copies = 0

    def all_gather(self, t: Tensor) -> List[Tensor]:
        """Every rank's `t` (same shape and dtype on every rank), in rank order, as `world` new tensors. Counts
        (world - 1) * t's bytes as received. Collective: every rank calls it."""
        t = t.contiguous()
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t)
        self.received += (self.world - 1) * t.numel() * t.element_size()
        return out

    def hold(self, nbytes: int, with_copies: Optional[int] = None) -> None:
        """Record that the attention holds `nbytes` (and `with_copies` including transient gather parts)."""
        self.held = max(self.held, int(nbytes))
        self.held_with_copies = max(self.held_with_copies, int(nbytes if with_copies is None else with_copies))


def gather_padded(comm: Comm, t: Tensor, sizes: Sequence[int], dim: int) -> Tensor:
    """Every rank's t along `dim` (rank r's has sizes[r] entries there): padded to max(sizes), all-gathered,
    trimmed and concatenated in rank order (the padding rule of `sdvae_fast.parallel`). Records the held bytes
    (the result; with copies: parts + result)."""
    from sdvae_fast.parallel import _concat_padded, _padded

    parts = comm.all_gather(_padded(t, max(sizes), dim))
    out = _concat_padded(parts, list(sizes), dim)
    part_bytes = sum(p.numel() * p.element_size() for p in parts)
    comm.hold(out.numel() * out.element_size(), part_bytes + out.numel() * out.element_size())
    return out


def merged_stats(comm: Comm, band: Tensor, norm: torch.nn.GroupNorm) -> Tuple[Tensor, Tensor]:
    """The GroupNorm (mean, rstd) of the whole map, each (N, G) fp32, from this band: its (count, mean, M2)
    partials (`ops.group_norm_partials`) all-gathered and merged in rank order (`ops.merge_group_norm_partials`),
    as `RowParallelHooks.merge_stats` does: the same bits on every rank. Collective."""
    from sdvae_fast import ops

    partials = ops.group_norm_partials(band, norm.num_groups)
    stacked = comm.all_gather(torch.stack(tuple(partials)))  # world x (3, N, G)
    return ops.merge_group_norm_partials([tuple(p) for p in stacked], norm.eps)


# ---------------------------------------------------------------------------------------------------------------
# The online-softmax merge and the ring
# ---------------------------------------------------------------------------------------------------------------


def block_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    """One query block against one key/value block, unnormalised, in plain torch.

    With s = scale * q k^T: m = max_j s_ij, l = sum_j exp(s_ij - m_i), o = sum_j exp(s_ij - m_i) v_j.

    Args:
        q: (N, T_q, D) fp32, any strides. k, v: (N, T_b, D) fp32, T_b >= 1. scale: the softmax scale.
    Returns:
        (o (N, T_q, D), m (N, T_q), l (N, T_q)), fp32. Holds one (N, T_q, T_b) score block while it runs.
    Raises:
        ValueError: an empty key block (T_b == 0) or mismatched shapes.
    """
    if k.shape[1] == 0 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"block_attention needs q (N, T_q, D), k = v (N, T_b >= 1, D); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    s = torch.matmul(q, k.transpose(1, 2)).mul_(scale)  # (N, T_q, T_b)
    m = s.amax(dim=-1)  # (N, T_q)
    p = s.sub_(m.unsqueeze(-1)).exp_()  # in place: exp(s - m)
    return torch.matmul(p, v), m, p.sum(dim=-1)


def online_softmax_merge(state: Optional[Tuple[Tensor, Tensor, Tensor]],
                         block: Tuple[Tensor, Tensor, Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """Merge the partial attention of one more key/value block into a running one (online softmax).

    For the same queries and disjoint key sets K1 (the running state) and K2 (the block), each given as
    (o, m, l) with m = max over the set of the logits s, l = sum exp(s - m), o = sum exp(s - m) v (unnormalised):
        m = max(m1, m2),  a1 = exp(m1 - m),  a2 = exp(m2 - m),
        l = a1 * l1 + a2 * l2,  o = a1 * o1 + a2 * o2,
    which is (o, m, l) of K1 u K2 exactly (up to rounding); softmax(s) v over all keys is o / l at the end. Every
    exponent is <= 0, so nothing overflows. This is the online normaliser of Milakov & Gimelshein, "Online
    normalizer calculation for softmax" (2018, arXiv:1805.02867), as FlashAttention (Dao et al. 2022,
    arXiv:2205.14135) applies it across key blocks; written here in plain torch.

    Args:
        state: the running (o (N, T_q, D), m (N, T_q), l (N, T_q)) fp32, or None before the first block.
        block: one block's (o, m, l) of the same shapes (from `block_attention`).
    Returns:
        The merged (o, m, l), new tensors (the inputs are not modified).
    """
    if state is None:
        return block
    o1, m1, l1 = state
    o2, m2, l2 = block
    m = torch.maximum(m1, m2)
    a1, a2 = torch.exp(m1 - m), torch.exp(m2 - m)
    return o1 * a1.unsqueeze(-1) + o2 * a2.unsqueeze(-1), m, l1 * a1 + l2 * a2


def ring_attention(comm: Comm, q: Tensor, kv: Tensor, sizes: Sequence[int], scale: float,
                   waits: Optional[List[float]] = None) -> Tensor:
    """softmax(q k^T * scale) v over the keys and values of every rank, passed around a ring.

    Rank r starts with its own K/V block (padded to max(sizes) tokens); at each of the world - 1 transfer steps it
    sends the block it holds to rank r + 1 and receives rank r - 1's into the other buffer (`batch_isend_irecv`,
    posted before the current block's compute, waited on after it), so after step s it holds the block of rank
    r - s - 1 (mod world). Each block's partial attention (`block_attention`, trimmed to its true length) is merged
    with `online_softmax_merge`; the result is normalised at the end. Collective (point-to-point): every rank
    calls it with the same `sizes`.

    Args:
        comm: counts the received bytes and the two K/V buffers held.
        q: this rank's queries (N, T_r, D) fp32, any strides.
        kv: this rank's keys and values (N, T_r, 2D) fp32, keys first, any strides; T_r == sizes[rank].
        sizes: tokens of every rank, in rank order. scale: the softmax scale.
        waits: when a list, the seconds spent waiting for each transfer after the compute are appended.
    Returns:
        (N, T_r, D) fp32, contiguous.
    Raises:
        ValueError: kv's token count differs from sizes[rank], or q and kv disagree in shape.
    """
    rank, world = comm.rank, comm.world
    d = q.shape[-1]
    if kv.shape[1] != sizes[rank] or kv.shape[-1] != 2 * d or q.shape[:2] != kv.shape[:2]:
        raise ValueError(f"rank {rank}: q {tuple(q.shape)} and kv {tuple(kv.shape)} do not fit sizes {list(sizes)}")
    from sdvae_fast.parallel import _padded

    cur = _padded(kv, max(sizes), 1)
    nxt = torch.empty_like(cur) if world > 1 else None
    comm.hold(2 * cur.numel() * cur.element_size() if world > 1 else cur.numel() * cur.element_size())
    state = None
    for step in range(world):
        requests = []
        if step < world - 1:  # post the next transfer before computing on the current block
            requests = dist.batch_isend_irecv([dist.P2POp(dist.isend, cur, (rank + 1) % world),
                                               dist.P2POp(dist.irecv, nxt, (rank - 1) % world)])
            comm.received += nxt.numel() * nxt.element_size()
        n = sizes[(rank - step) % world]  # the block held now came from rank - step
        state = online_softmax_merge(state, block_attention(q, cur[:, :n, :d], cur[:, :n, d:], scale))
        t0 = time.perf_counter()
        for request in requests:
            request.wait()
        if waits is not None and requests:
            waits.append(time.perf_counter() - t0)
        if requests:
            cur, nxt = nxt, cur
    o, _, l = state
    return o.div_(l.unsqueeze(-1))


# ---------------------------------------------------------------------------------------------------------------
# The three strategies (each: this rank's band in, this rank's output band out)
# ---------------------------------------------------------------------------------------------------------------


def strategy_gather_map(comm: Comm, band: Tensor, attn, bands: Sequence[Tuple[int, int]]) -> Tensor:
    """A: the whole map on every rank (bands all-gathered, padded to the tallest), `vae_attention_block` on it,
    this rank's rows kept.

    Args:
        band: (N, C, rows_r, W) fp32, this rank's rows bands[rank]. attn: the attention module.
        bands: [start, end) latent rows of every rank.
    Returns:
        (N, C, rows_r, W) fp32, a view of the whole map's output.
    """
    from sdvae_fast.fast.units import vae_attention_block

    full = gather_padded(comm, band, [e - s for s, e in bands], 2)
    start, end = bands[comm.rank]
    return vae_attention_block(full, attn)[:, :, start:end]


def strategy_gather_kv(comm: Comm, band: Tensor, attn, bands: Sequence[Tuple[int, int]]) -> Tensor:
    """B: today's design. Merged GroupNorm statistics, then `vae_attention_block(band, attn, stats=...,
    gather_kv=...)` whose gather, like `RowParallelHooks.gather_tokens`, all-gathers the token counts, then every
    band's (N, T_r, 2*inner) keys and values padded to the largest, trims and concatenates them in image order.

    Args and returns: as `strategy_gather_map`.
    """
    from sdvae_fast.fast.units import vae_attention_block

    def gather_kv(kv: Tensor) -> Tensor:
        """(N, T_r, 2*inner) fp32 this band's keys and values -> (N, T_all, 2*inner) every band's. Collective."""
        sizes = [int(s) for s in comm.all_gather(torch.tensor([kv.shape[1]], dtype=torch.int64))]
        return gather_padded(comm, kv, sizes, 1)

    stats = merged_stats(comm, band, attn.group_norm)
    return vae_attention_block(band, attn, stats=stats, gather_kv=gather_kv)


def strategy_gather_kv_hooks(band: Tensor, attn) -> Tensor:
    """B through the project's own `sdvae_fast.parallel.RowParallelHooks` (merge_stats, gather_tokens), for the
    bitwise cross-check of `strategy_gather_kv`; (N, C, rows_r, W) fp32. Collective."""
    from sdvae_fast import ops
    from sdvae_fast.fast.units import vae_attention_block
    from sdvae_fast.parallel import RowParallelHooks

    hooks = RowParallelHooks(None, what="pp_attention cross-check")
    stats = hooks.merge_stats(ops.group_norm_partials(band, attn.group_norm.num_groups), attn.group_norm.eps)
    return vae_attention_block(band, attn, stats=stats, gather_kv=hooks.gather_tokens)


def strategy_ring(comm: Comm, band: Tensor, attn, bands: Sequence[Tuple[int, int]],
                  waits: Optional[List[float]] = None) -> Tensor:
    """C: merged GroupNorm statistics; GroupNorm + fused q/k/v 1x1 projection of the band (the op and cached
    weights `vae_attention_block` uses); `ring_attention` over every rank's K/V; out projection + residual on the
    band (likewise), divided by the module's rescale_output_factor when it is not 1.

    Args: as `strategy_gather_map`; `waits` as in `ring_attention`. Returns (N, C, rows_r, W) fp32.
    Raises:
        ValueError: a module with more than one head (the VAE has one; the ring here is written for one).
    """
    from sdvae_fast import ops
    from sdvae_fast.fast.units import fused_qkv_weights, out_projection_weight

    if int(attn.heads) != 1:
        raise ValueError(f"the ring is written for one head; the module has {attn.heads}")
    n, c, h, w = band.shape
    gn = attn.group_norm
    stats = merged_stats(comm, band, gn)
    w_qkv, b_qkv = fused_qkv_weights(attn, band.dtype, band.device)
    inner = w_qkv.shape[0] // 3
    qkv = ops.gn_silu_conv2d(band, w_qkv, b_qkv, norm_weight=gn.weight, norm_bias=gn.bias, num_groups=gn.num_groups,
                             eps=gn.eps, silu=False, padding=0, stats=stats)  # (N, 3*inner, h, w) channels_last
    tokens = qkv.permute(0, 2, 3, 1).reshape(n, h * w, 3 * inner)
    sizes = [(e - s) * w for s, e in bands]
    out = ring_attention(comm, tokens[..., :inner], tokens[..., inner:], sizes, float(attn.scale), waits)
    out = out.view(n, h, w, inner).permute(0, 3, 1, 2)  # (N, inner, h, w) channels_last view
    proj = attn.to_out[0]
    y = ops.gn_silu_conv2d(out, out_projection_weight(proj, band.dtype, band.device), proj.bias, norm_weight=None,
                           padding=0, residual=band if attn.residual_connection else None)
    rescale = float(attn.rescale_output_factor)
    return y if rescale == 1.0 else y / rescale


# ---------------------------------------------------------------------------------------------------------------
# Analytic numbers
# ---------------------------------------------------------------------------------------------------------------


def analytic_row(rows: int, cols: int, world: int, channels: int = 512, batch: int = 1,
                 bytes_per_element: int = 4) -> Dict[str, Dict[str, float]]:
    """Per-rank bytes received, bytes held and attention FLOPs of each strategy, from the shapes alone, for the
    rank with the largest band (bands as `sdvae_fast.parallel.row_bands`, padded to the largest for the gathers).

    Counts what crosses the wire (a rank's own part excluded) and, as the measured columns, the whole map (A),
    all keys and values (B), two K/V blocks (C) as held; the small GroupNorm and token-count gathers are left out
    (3 * N * G * 4 bytes per other rank). FLOPs: 4 * T_q * T_kv * C.

    Returns:
        {strategy: {"received": bytes, "held": bytes, "held_with_copies": bytes, "flops": FLOPs,
        "steps": latency steps (collectives or ring transfers)}}.
    Raises:
        ValueError: from row_bands (world larger than rows, or < 1).
    """
    from sdvae_fast.parallel import row_bands

    bands = row_bands(rows, world)
    t_max = max(e - s for s, e in bands) * cols
    t_all = rows * cols
    row_map = batch * channels * bytes_per_element  # bytes of one token of the map
    row_kv = 2 * row_map  # keys and values of one token (inner = C)
    other = world - 1
    return {
        STRATEGIES[0]: dict(received=other * t_max * row_map, held=t_all * row_map,
                            held_with_copies=(world * t_max + t_all) * row_map,
                            flops=4.0 * t_all * t_all * channels * batch, steps=1),
        STRATEGIES[1]: dict(received=other * t_max * row_kv, held=t_all * row_kv,
                            held_with_copies=(world * t_max + t_all) * row_kv,
                            flops=4.0 * t_max * t_all * channels * batch, steps=1),
        STRATEGIES[2]: dict(received=other * t_max * row_kv, held=2 * t_max * row_kv,
                            held_with_copies=2 * t_max * row_kv,
                            flops=4.0 * t_max * t_all * channels * batch, steps=other),
    }


# ---------------------------------------------------------------------------------------------------------------
# The ranks
# ---------------------------------------------------------------------------------------------------------------


def worker(rank: int, world: int, port: int, cfg: dict, outdir: str) -> None:
    """One rank (started by `torch.multiprocessing`): join the gloo group, and for every map size check and time
    the three strategies; rank 0 writes {"rows": [...]} to outdir/world{world}.json.

    cfg: threads, timeouts, repeats, warmup, the attention spec (`attention_state`), and per size the input
    ("inputs": {size: (1, C, size, size) fp32}) and references ("refs": {size: (y32, y64)}). Raises whatever a
    collective or a check raises (AssertionError for a strategy that is not exact, for B's hooks cross-check).
    """
    from sdvae_fast.parallel import gather_rows, row_bands

    torch.set_num_threads(cfg["threads"])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=cfg["collective_timeout"]))
    try:
        attn = build_attention(cfg["spec"])
        comm = Comm()
        rows_out = []
        for size in cfg["sizes"]:
            x = cfg["inputs"][size]
            y32, y64 = cfg["refs"][size]
            bands = row_bands(size, world)
            start, end = bands[rank]
            band = x[:, :, start:end].contiguous()
            runs = {
                STRATEGIES[0]: lambda b=band, bs=bands: strategy_gather_map(comm, b, attn, bs),
                STRATEGIES[1]: lambda b=band, bs=bands: strategy_gather_kv(comm, b, attn, bs),
                STRATEGIES[2]: lambda b=band, bs=bands: strategy_ring(comm, b, attn, bs),
            }
            heights = [e - s for s, e in bands]
            results = {}
            with torch.inference_mode():
                for name, fn in runs.items():  # one checked run each, counting bytes
                    comm.reset()
                    y_band = fn()
                    counts = dict(received=comm.received, held=comm.held, held_with_copies=comm.held_with_copies)
                    counts = {k: int(max(comm.all_gather(torch.tensor([v], dtype=torch.int64))))
                              for k, v in counts.items()}  # the largest over the ranks
                    if name == STRATEGIES[1]:
                        same = torch.equal(strategy_gather_kv_hooks(band, attn), y_band)
                        flags = comm.all_gather(torch.tensor([int(same)]))
                        assert all(int(f) for f in flags), "B differs from RowParallelHooks' result (bits)"
                    full = gather_rows(y_band.contiguous(), heights=heights)
                    results[name] = dict(counts, full=full)
                times = {name: [] for name in runs}
                ring_waits: List[float] = []
                for round_ in range(cfg["warmup"] + cfg["repeats"]):
                    for name, fn in runs.items():
                        waits = [] if name == STRATEGIES[2] else None
                        dist.barrier()
                        t0 = time.perf_counter()
                        if waits is None:
                            fn()
                        else:
                            strategy_ring(comm, band, attn, bands, waits)
                        elapsed = torch.tensor([time.perf_counter() - t0, sum(waits or [])], dtype=torch.float64)
                        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank
                        if round_ >= cfg["warmup"]:
                            times[name].append(float(elapsed[0]))
                            if waits is not None:
                                ring_waits.append(float(elapsed[1]))
            if rank == 0:
                t_max = max(heights) * size
                t_all = size * size
                c = x.shape[1]
                for name in runs:
                    full = results[name]["full"]
                    branch_ref64 = (y64 - x.double())
                    rows_out.append(dict(
                        size=size, world=world, strategy=name,
                        rel_l2=rel_l2(full, y32), max_abs=float((full - y32).abs().max()),
                        rel_l2_branch=rel_l2(full - x, y32 - x),
                        rel_l2_branch_fp64=rel_l2((full.double() - x.double()), branch_ref64),
                        times=times[name], median_s=statistics.median(times[name]),
                        received=results[name]["received"], held=results[name]["held"],
                        held_with_copies=results[name]["held_with_copies"],
                        flops=4.0 * (t_all if name == STRATEGIES[0] else t_max) * t_all * c,
                        ring_wait_median_s=statistics.median(ring_waits) if name == STRATEGIES[2] else None,
                    ))
        if rank == 0:
            with open(os.path.join(outdir, f"world{world}.json"), "w") as f:
                json.dump({"rows": rows_out}, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_world(world: int, cfg: dict, timeout: float) -> Tuple[List[dict], str]:
    """Spawn `world` ranks of `worker`, wait at most `timeout` seconds. Returns (rows, problem): rank 0's rows and
    "" or why there are none (a rank's error, or the time-out, after which the ranks this call started are
    terminated). Never raises for a failing rank."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as outdir:
        ctx = mp.start_processes(worker, args=(world, free_port(), cfg, outdir), nprocs=world, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + timeout
        problem = ""
        try:
            while not ctx.join(timeout=2):
                if time.monotonic() > deadline:
                    problem = f"timed out after {timeout:.0f} s (ranks terminated)"
                    for p in ctx.processes:
                        if p.is_alive():
                            p.terminate()
                    for p in ctx.processes:
                        p.join(10)
                    break
        except Exception as e:  # ProcessRaisedException / ProcessExitedException
            lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
            problem = "a rank failed: " + (lines[-1].strip() if lines else type(e).__name__)
        path = os.path.join(outdir, f"world{world}.json")
        if not os.path.exists(path):
            return [], problem or "no result written"
        with open(path) as f:
            return json.load(f)["rows"], problem


# ---------------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------------


def check_merge(seed: int = 0) -> float:
    """Self-test of `block_attention` + `online_softmax_merge` in one process: 64 queries against 3 uneven key
    blocks (50, 7, 100 keys) with logits spread over about +-60, merged, against fp64 SDPA over all keys.
    Returns the relative L2 error; raises AssertionError above 1e-5."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 64, 32, generator=g) * 4
    k = torch.randn(1, 157, 32, generator=g) * 4
    v = torch.randn(1, 157, 32, generator=g)
    scale = 32 ** -0.5
    state = None
    for lo, hi in ((0, 50), (50, 57), (57, 157)):
        state = online_softmax_merge(state, block_attention(q, k[:, lo:hi], v[:, lo:hi], scale))
    got = state[0] / state[2].unsqueeze(-1)
    want = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=scale)
    err = rel_l2(got, want)
    assert err < 1e-5, f"online-softmax merge self-test: relative L2 {err:.3g}"
    return err


def kernel_compare(tq: int, tkv: int, d: int, repeats: int = 3) -> Dict[str, float]:
    """Median seconds (of `repeats`, after one warm-up) on this process's threads of one (1, tq, d) x (1, tkv, d)
    fp32 attention: PyTorch's SDPA (what `ops.attention` runs on the CPU, A and B) and `block_attention` plus the
    final division (C's block computation). Says how much of a B-vs-C time difference on the CPU is the attention
    implementation rather than the communication. Returns {"sdpa": s, "matmul": s}."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, t, d, generator=g) for t in (tq, tkv, tkv))
    scale = d ** -0.5

    def blocks():
        """C's computation of one block, normalised: (1, tq, d) fp32."""
        o, _, l = block_attention(q, k, v, scale)
        return o / l.unsqueeze(-1)

    out = {}
    for name, fn in (("sdpa", lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)),
                     ("matmul", blocks)):
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times)
    return out


def mib(nbytes: float) -> str:
    """Bytes as MiB with 2 decimals (or GiB with 2 decimals from 1 GiB up)."""
    return f"{nbytes / 2 ** 30:.2f} GiB" if nbytes >= 2 ** 30 else f"{nbytes / 2 ** 20:.2f} MiB"


def measured_table(rows: List[dict]) -> str:
    """The measured rows as a markdown table (one line per size, world and strategy)."""
    head = ("| latent (image) | ranks | strategy | rel L2 | rel L2 branch | max abs | median ms (min-max) "
            "| received / rank | held / rank (with gather copies) | attn GFLOP / rank |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        ms = [t * 1e3 for t in r["times"]]
        lines.append(
            f"| {r['size']}x{r['size']} ({8 * r['size']}^2) | {r['world']} | {r['strategy']} | {r['rel_l2']:.2e} "
            f"| {r['rel_l2_branch']:.2e} | {r['max_abs']:.2e} | {statistics.median(ms):.1f} ({min(ms):.1f}-"
            f"{max(ms):.1f}) | {mib(r['received'])} | {mib(r['held'])} ({mib(r['held_with_copies'])}) "
            f"| {r['flops'] / 1e9:.2f} |")
    return head + "\n".join(lines) + "\n"


def analytic_table(cases: Sequence[Tuple[int, int, int, int]]) -> str:
    """Markdown table of `analytic_row` for (rows, cols, world, bytes per element) cases."""
    head = ("| latent tokens (image) | ranks | dtype | strategy | received / rank | held / rank (with gather "
            "copies) | attn TFLOP / rank | latency steps |\n|---|---|---|---|---|---|---|---|\n")
    lines = []
    for rows, cols, world, nb in cases:
        for name, a in analytic_row(rows, cols, world, bytes_per_element=nb).items():
            lines.append(f"| {rows}x{cols} ({8 * rows}^2) | {world} | {'fp32' if nb == 4 else 'bf16'} | {name} "
                         f"| {mib(a['received'])} | {mib(a['held'])} ({mib(a['held_with_copies'])}) "
                         f"| {a['flops'] / 1e12:.1f} | {a['steps']} |")
    return head + "\n".join(lines) + "\n"


def reading(rows: List[dict], ref_err: Dict[int, float], factor: float, kernels: Tuple[int, int, Dict[str, float]],
            assumed_tflops: float = 500.0) -> str:
    """The document's reading: what was measured (generated from `rows`), what the analytic numbers say, and the
    recommendation. `kernels`: (T_q, T_kv, `kernel_compare` result); `assumed_tflops`: an attention throughput
    assumed (not measured) to turn FLOPs per byte into the link speed that keeps up."""
    by = {(r["size"], r["world"], r["strategy"]): r for r in rows}
    measured = []
    for (size, world) in sorted({(r["size"], r["world"]) for r in rows}):
        a, b, c = (by.get((size, world, s)) for s in STRATEGIES)
        if a and b and c:
            measured.append(
                f"{size}x{size} on {world}: B {b['median_s'] / a['median_s']:.2f}x A's time, C "
                f"{c['median_s'] / b['median_s']:.2f}x B's (C waited a median {1e3 * c['ring_wait_median_s']:.1f} "
                f"ms per run for transfers after its compute)")
    kq, kk, kt = kernels
    cases = [(size, world, by[(size, world, STRATEGIES[1])], by[(size, world, STRATEGIES[2])])
             for (size, world) in sorted({(r["size"], r["world"]) for r in rows})
             if (size, world, STRATEGIES[1]) in by and (size, world, STRATEGIES[2]) in by]
    overlap = [f"{s}x{s} on {w}" for s, w, b, c in cases
               if min(c["times"]) <= max(b["times"]) and min(b["times"]) <= max(c["times"])]
    kernel_times = (f"one {kq}-query x {kk}-key attention took {kt['sdpa'] * 1e3:.0f} ms in SDPA and "
                    f"{kt['matmul'] * 1e3:.0f} ms as C's two matmuls, on one thread of this machine in the same run; "
                    f"on a GPU both would be the flash kernel")
    if kt["matmul"] < 0.95 * kt["sdpa"]:
        kernel_text = (f"Part of any lead of C over B on this CPU is the attention implementation, not the ring: "
                       f"{kernel_times}.")
    else:
        kernel_text = (f"The two CPU attention implementations are about as fast ({kernel_times}), so a difference "
                       f"between B and C here does not come from them.")
    if cases and len(overlap) == len(cases):
        noise_text = ("B's and C's time ranges (min-max) overlap in every case, so on this machine the two are not "
                      "told apart; a GPU measurement has to settle any difference in time between them.")
    else:
        apart = [f"{s}x{s} on {w} ({'C' if c['median_s'] < b['median_s'] else 'B'} faster)" for s, w, b, c in cases
                 if f"{s}x{s} on {w}" not in overlap]
        noise_text = (f"B's and C's time ranges (min-max) do not overlap in {', '.join(apart)}"
                      + (f"; they overlap in {', '.join(overlap)}." if overlap else "."))
    shares = [c["ring_wait_median_s"] / c["median_s"] for _, _, _, c in cases]
    wait_text = (f"C's waits for transfers after its compute were {100 * min(shares):.0f}-{100 * max(shares):.0f}% of "
                 f"its time (medians); where they are not zero they are most likely a peer that had not reached the "
                 f"step yet (shared cores, and on 4 ranks more ranks than cores) rather than bytes still on the wire"
                 f" (at most one {{block}} block per step here, over loopback).") if shares else ""
    big = analytic_row(1024, 1024, 8, bytes_per_element=4)
    big16 = analytic_row(1024, 1024, 8, bytes_per_element=2)
    a, b, c = (big[s] for s in STRATEGIES)
    intensity = b["flops"] / b["received"]
    link_gbs = assumed_tflops * 1e12 / intensity / 1e9
    max_block = max((r["received"] / (r["world"] - 1) for r in rows if r["strategy"] == STRATEGIES[2]
                     and r["world"] > 1), default=0)
    wait_text = wait_text.replace("{block}", mib(max_block))
    exact = ", ".join(f"{s}x{s}: {e:.2e}" for s, e in sorted(ref_err.items()))
    worlds = " and ".join(str(w) for w in sorted({r["world"] for r in rows}))
    return f"""\
**Exactness.** Every strategy matches one process's `vae_attention_block(full_map, attn)` to fp32 rounding, on
{worlds} ranks: A gives the same bits (it runs the same op on the same whole map); B and C reorder sums (merged
GroupNorm statistics, the softmax over key blocks), and their attention branch (y - x) is no further from the fp64
result than {factor:g}x the fp32 single-process one's own distance, which is (relative L2 of the branch) {exact}.
The whole-output relative L2 is smaller because the residual x dominates the output's norm. B run through the
project's `RowParallelHooks` gave the same bits as B here.

**The CPU times are not GPU numbers.** They come from gloo over loopback on 2 CPU cores that another engineer's
work shared, one thread per rank (4 ranks on 2 cores run two at a time), PyTorch's SDPA for A and B and plain
matmuls for C's blocks. They say which strategy does less work per rank on this machine, not how fast a GPU is.
Measured (median, slowest rank): {"; ".join(measured)}. A's attention FLOPs per rank do not fall with more
ranks (every rank computes the whole attention); B's and C's fall as 1/world, and the B/A time ratios above are
near 1/world. {noise_text} {kernel_text} {wait_text}

**Large images (analytic).** An 8192^2 image has a 1024x1024 latent map: T = 1,048,576 tokens, C = 512. On 8 ranks
(131,072 tokens each), per rank, fp32: A receives {mib(a['received'])}, holds the whole map ({mib(a['held'])}) and
computes {a['flops'] / 1e12:.0f} TFLOP, the whole attention, on every rank: the attention alone never gets faster
with more ranks. B receives twice A's bytes ({mib(b['received'])}, keys and values instead of the map), holds all
keys and values ({mib(b['held'])}; {mib(b['held_with_copies'])} while the gathered parts are concatenated) and
computes 1/8 of the attention ({b['flops'] / 1e12:.0f} TFLOP). C receives the same bytes as B in 7 steps of
{mib(c['received'] / 7)}, holds two blocks ({mib(c['held'])}) and computes the same FLOPs as B. In bf16 every byte
count halves (B holds {mib(big16[STRATEGIES[1]]['held'])} of keys and values). B's attention does
{intensity:,.0f} FLOPs per byte it receives: at an assumed {assumed_tflops:.0f} TFLOP/s of attention (an
assumption, not a measurement) any link faster than {link_gbs:.1f} GB/s delivers the keys and values before the
compute on them is done, so at this size the communication (and whether it overlaps the compute) hardly matters
next to the compute, and the difference between B and C is memory. The keys and values live at latent
resolution, during the mid block: on 8 ranks at 8192^2 the decode's peak per rank is 10.08 GiB of bf16
activations (docs/patch_parallel_memory.md, whose model includes the attention unit's gathered keys and values),
so B's 2 GiB of bf16 keys and values (4 GiB while the parts are concatenated) do not set the decode's peak.

**Recommendation: B (gather K/V) by default.** It cuts the attention's compute per rank by the world size (A's
redundant O(T^2 C) on every rank caps the speed-up of the whole decode at large images), costs one collective,
and runs the existing Triton flash kernel unchanged; twice A's bytes is cheap next to the compute it saves, and
its memory (all keys and values, 2 T C elements) is under the decode's peak. C needs no more bytes and holds only
two blocks, but takes world - 1 dependent steps and, to use the Triton kernel, an attention kernel that also
returns each query's log-sum-exp (or max and sum) so the blocks can be merged; it is the option for when all
keys and values do not fit (many more tokens per rank than the decode's peak allows, or many more ranks with
little memory each). A cheaper improvement to B than a ring: with equal bands and batch 1, gather into one
preallocated buffer (`all_gather_into_tensor`, which is then the K/V tensor itself) instead of world parts plus a
concatenated copy, which halves B's transient (the bracketed numbers).
"""


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse arguments, build the weights, inputs and references, run every world, print the table and write the
    document. Returns the exit status (module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4], help="world sizes (ranks) to run")
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64], help="latent map sides (tokens = side^2)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per strategy (>= 5 for the document)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs per strategy first")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--preset", default="sd15", help="sdvae_fast preset of the weights")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and (plus the side) of the inputs")
    p.add_argument("--q-gain", type=float, default=4.0, help="factor on to_q's weight and bias (every path)")
    p.add_argument("--tolerance-factor", type=float, default=2.0,
                   help="a strategy's branch may be this many times the fp32 reference's distance from fp64")
    p.add_argument("--timeout", type=float, default=300, help="seconds for one world before its ranks are ended")
    p.add_argument("--collective-timeout", type=int, default=120, help="seconds a collective may wait")
    p.add_argument("--out", default=str(ROOT / "docs" / "patch_parallel_attention.md"), help="markdown output")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--json", default=None, help="also write the raw rows and reference errors to this file")
    args = p.parse_args(argv)
    if min(args.worlds) < 1 or min(args.sizes) < 1 or args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        p.error("worlds, sizes, repeats and threads must be positive, warmup >= 0")
    for world in args.worlds:
        for size in args.sizes:
            if world > size:
                p.error(f"world {world} is larger than the {size} rows of a {size}x{size} map")

    from sdvae_fast.fast.units import vae_attention_block

    torch.set_num_threads(args.threads)
    merge_err = check_merge()
    spec = attention_state(args.preset, args.seed, args.q_gain)
    attn32, attn64 = build_attention(spec), build_attention(spec, torch.float64)
    channels = spec["config"]["query_dim"]
    inputs, refs, ref_err, logit_spread = {}, {}, {}, {}
    with torch.inference_mode():
        for size in args.sizes:
            x = make_input(size, channels, args.seed)
            y32 = vae_attention_block(x, attn32).contiguous()
            y64 = vae_attention_block(x.double(), attn64).contiguous()
            inputs[size], refs[size] = x, (y32, y64)
            ref_err[size] = rel_l2(y32.double() - x.double(), y64 - x.double())
            h = attn32.group_norm(x).flatten(2).transpose(1, 2)
            s = torch.matmul(attn32.to_q(h), attn32.to_k(h).transpose(1, 2)) * attn32.scale
            logit_spread[size] = (float(s.std()), float((s.amax(-1) - s.amin(-1)).mean()))
    t_kv = max(args.sizes) ** 2
    kernels = (t_kv // min(args.worlds), t_kv, kernel_compare(t_kv // min(args.worlds), t_kv, channels))
    cfg = dict(threads=args.threads, collective_timeout=args.collective_timeout, repeats=args.repeats,
               warmup=args.warmup, spec=spec, sizes=args.sizes, inputs=inputs, refs=refs)
    rows, problems = [], []
    for world in args.worlds:
        got, problem = run_world(world, cfg, args.timeout)
        rows += got
        if problem:
            problems.append(f"world {world}: {problem}")
    not_exact = [f"{r['strategy']} {r['size']}x{r['size']} on {r['world']}: branch {r['rel_l2_branch_fp64']:.2e} "
                 f"from fp64 > {args.tolerance_factor:g} x {ref_err[r['size']]:.2e}"
                 for r in rows if r["rel_l2_branch_fp64"] > args.tolerance_factor * ref_err[r["size"]]]
    rows.sort(key=lambda r: (r["size"], r["world"], STRATEGIES.index(r["strategy"])))
    table = measured_table(rows)
    command = "python " + " ".join([os.path.relpath(__file__, ROOT)] + list(sys.argv[1:] if argv is None else argv))
    spread = "; ".join(f"{s}x{s}: std {a:.2f}, mean max-min per query {b:.1f}" for s, (a, b) in
                       sorted(logit_spread.items()))
    print(table)
    for line in problems + not_exact:
        print("PROBLEM:", line)
    status_line = ("Problems: " + "; ".join(problems + not_exact) if problems or not_exact
                   else "All runs finished; every strategy exact to fp32 rounding (asserted).")
    doc = f"""# Patch parallelism: the mid-block attention, gather the map, gather K/V, or a ring

Date: {DATE}. Commit: {git_commit()} (the working tree as it was, with others' uncommitted changes; the K/V gather
measured as B is the working tree's `sdvae_fast.fast.units.vae_attention_block(..., gather_kv=...)` and
`sdvae_fast.parallel.RowParallelHooks.gather_tokens`). torch {torch.__version__}, CPU, gloo, {args.threads}
thread(s) per rank, on a 2-core machine shared with other work.

Command:

    {command}

Three ways for each rank of a patch-parallel VAE to compute the mid-block attention of its band of latent rows
(one head, C = 512, batch 1, fp32), on the same weights (`AutoencoderKL.from_preset("{args.preset}",
seed={args.seed}).decoder.mid_block.attentions[0]`, to_q's weight and bias x {args.q_gain:g} on every path so the
softmax is far from uniform: logits {spread}) and the same standard-normal input:

- **A gather map**: all-gather the bands into the whole map, the attention unit on it on every rank, keep this
  band's rows (the design before the K/V gather);
- **B gather K/V** (the design now): GroupNorm statistics merged across ranks, this band's q, k, v; the keys and
  values of all tokens all-gathered (bands padded to the largest, trimmed); this band's queries attend to them;
- **C ring**: as B up to q, k, v; the K/V blocks go around the ring (world - 1 `batch_isend_irecv` steps, the next
  transfer posted before the current block's compute) and the partial attentions are merged with the online
  softmax (running max and sum per query; Milakov & Gimelshein 2018, as in FlashAttention).

Columns: rel L2 = ||y - y_ref|| / ||y_ref|| of the whole output (all bands) against one process's
`vae_attention_block(full_map, attn)` in fp32; rel L2 branch = the same for y - x (the attention's contribution,
which the residual does not dilute); max abs = max |y - y_ref|; median ms = the median over {args.repeats} timed runs
(after {args.warmup} warm-ups, strategies interleaved, a barrier before each run) of the slowest rank's wall time,
with the range; received = bytes a rank receives (its own part excluded; the GroupNorm and token-count gathers
included); held = the largest tensors kept for the attention: the whole map (A), keys and values of all tokens
(B), two K/V blocks (C), in brackets with the all_gather's per-rank parts alive while they are concatenated;
attn GFLOP = 4 * T_q * T_kv * C for the rank with the largest band (projections not included: 8 * T_q * C^2, on
the whole map for A). The online-softmax merge alone was also checked against fp64 SDPA on blocks of 50, 7 and
100 keys with logits up to +-60 (relative L2 {merge_err:.1e}).

## Measured (CPU, gloo: not GPU numbers)

{table}
{status_line}

## Analytic: an 8192^2 image (1024x1024 latent tokens) on 8 ranks (computed, not run)

Bands of 128 latent rows (131,072 tokens); same definitions as above; latency steps = collectives (A, B: one
all_gather, plus the small statistics and size gathers) or dependent ring transfers (C).

{analytic_table([(1024, 1024, 8, 4), (1024, 1024, 8, 2)])}
## Reading

{reading(rows, ref_err, args.tolerance_factor, kernels)}"""
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "ref_err": ref_err, "problems": problems,
                                               "not_exact": not_exact}, indent=1))
    if not args.no_write:
        Path(args.out).write_text(doc)
        print(f"wrote {args.out}")
    assert not not_exact, "not exact to fp32 rounding: " + "; ".join(not_exact)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
