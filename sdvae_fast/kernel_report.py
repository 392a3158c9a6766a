"""Static cost model of the Triton kernels on Hopper (sm_90), from their compiled SASS, on a machine without a GPU.

What it does (`sdvae-fast kernel-report --target sm_90`, or `build_report` from Python):

1. Records the kernel launches of the VAE's units by calling the real launchers (`gn_silu_conv2d`,
   `upsample_conv2d`, `attention_forward`, `group_norm_stats`) on meta tensors while every Triton kernel of
   `sdvae_fast.kernels` is swapped for a recorder (`record_launches`). The recorded arguments are specialised
   exactly as Triton's JIT would specialise them on a GPU (its own binder: integers equal to 1 become
   constants, integers and pointers divisible by 16 get the divisibility hint), so the compile below is the
   one a GPU would run. Identical specialisations are merged into one *variant*.
2. Compiles every variant for sm_90 with each autotune candidate the launcher offers (Triton's bundled ptxas),
   disassembles it with the bundled `cuobjdump -sass` and reads registers, spills and shared memory.
3. Finds the main loop in the SASS (`find_main_loop`: the backward branch whose body holds the most
   tensor-core work, else the largest loop), counts its instructions per pipe (`count_instructions`) and
   turns them into cycles per SM per loop iteration (`pipe_cycles`) with the per-SM rates of `SM90_RATES`.

The model (one CTA's loop iteration; all CTAs on an SM share the pipes, so ratios do not depend on occupancy):

    tensor cycles = MACs / tensor rate            (HGMMA m x n x k per warpgroup, HMMA per warp)
    pipe cycles   = warp instructions * num_warps * 32 lanes / lanes per clock of that pipe
    issue cycles  = warp instructions * num_warps / 4 schedulers
    lsu cycles    = sum over memory instructions of max(1, bytes per warp / 128 bytes per clock)
    fraction of tensor rate <= tensor cycles / max(all pipe cycles)

It is a static, best-case bound: perfect overlap of the pipes, no latency, no memory stalls, every predicated
instruction counted as executed, branches inside the loop counted as if every path ran. Its use is to rank
variants and to tell which pipe caps a kernel before a GPU measures it (`bench/gpu_check.sh` prints measured
times beside these estimates when a GPU is there; `calibration_rows`). docs/cost_model.md records the numbers.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

# ---------------------------------------------------------------------------------------------------------------
# Per-SM rates of the H100 / H200 (sm_90). Every number names its source.
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rate:
    """One throughput of an sm_90 SM: `value` per clock per SM in `unit`, and where the number comes from."""

    value: float
    unit: str
    source: str


_CUDA_GUIDE = ("CUDA C++ Programming Guide, section 'Arithmetic Instructions', table 'Throughput of Native "
               "Arithmetic Instructions', compute capability 9.0 column "
               "(https://docs.nvidia.com/cuda/cuda-c-programming-guide/index.html#arithmetic-instructions)")
_WHITEPAPER = ("NVIDIA H100 Tensor Core GPU Architecture whitepaper (2022): H100 SXM5 dense BF16/FP16 tensor "
               "989.4 TFLOPS, TF32 494.7, FP8 1978.9, on 132 SMs with 4 tensor cores each at the 1.83 GHz "
               "boost clock (989.4e12 / (2 * 132 * 1.83e9) = 2048 MAC per clock per SM); the same SM in the H200 "
               "(https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet)")
_PIPES_DOC = ("Nsight Compute Kernel Profiling Guide, 'Pipelines' (alu: integer, logic, bit manipulation, FP32 "
              "compare and select; fma: FP32 add/mul/fma and IMAD; xu: transcendentals (MUFU) and conversions; "
              "lsu: loads, stores, shuffles) "
              "(https://docs.nvidia.com/nsight-compute/ProfilingGuide/index.html#metrics-hw-model); GH100: "
              "FMAheavy takes IMAD and FP32, FMAlite FP32 only, 64 lanes each "
              "(https://forums.developer.nvidia.com/t/separate-cuda-core-pipeline-for-fp16-and-fp32/302018/7)")
_SMEM_DOC = ("CUDA C++ Programming Guide, 'Shared Memory' (compute capability 5.x and later): 32 banks of 32 bits, "
             "each delivering 32 bits per clock, i.e. 128 bytes per clock per SM; global loads go through the same "
             "L1 data path in 128-byte wavefronts "
             "(https://docs.nvidia.com/cuda/cuda-c-programming-guide/index.html#shared-memory-5-x)")
_TUNING = ("NVIDIA Hopper Tuning Guide, 'Occupancy' and 'Unified Shared Memory/L1/Texture Cache': 64K 32-bit "
           "registers, 64 warps and 32 thread blocks per SM; 228 KB shared memory per SM, 227 KB per block "
           "(https://docs.nvidia.com/cuda/hopper-tuning-guide/index.html)")

SM90_RATES: Dict[str, Rate] = {
    "tensor_f16": Rate(2048, "dense FP16/BF16 MAC (fp32 accumulate)", _WHITEPAPER),
    "tensor_tf32": Rate(1024, "dense TF32 MAC", _WHITEPAPER),
    "tensor_fp8": Rate(4096, "dense FP8 MAC", _WHITEPAPER),
    "fma": Rate(128, "FP32 add/mul/fma lanes (IMAD: 64, FMAheavy only)", _CUDA_GUIDE + "; " + _PIPES_DOC),
    "alu": Rate(64, "integer add/compare/logic/shift lanes", _CUDA_GUIDE),
    "xu": Rate(16, "MUFU (ex2, rcp, rsq, lg2, sin, cos, tanh) and type-conversion lanes", _CUDA_GUIDE),
    "lsu": Rate(128, "bytes of shared memory / L1 per clock", _SMEM_DOC),
    "issue": Rate(4, "warp instructions (4 schedulers, one instruction per clock each)",
                  _WHITEPAPER + " (SM diagram: 4 partitions, one warp scheduler each, 32 threads/clk)"),
    "registers": Rate(65536, "32-bit registers per SM", _TUNING),
    "smem": Rate(233472, "bytes of shared memory per SM (228 KB)", _TUNING),
    "smem_block": Rate(232448, "bytes of shared memory per block (227 KB)", _TUNING),
    "warps": Rate(64, "resident warps per SM", _TUNING),
    "blocks": Rate(32, "resident blocks per SM", _TUNING),
}

#: Device-level numbers for the memory-traffic side of the comparisons (docs/cost_model.md).
DEVICES = {
    "H100-SXM": {"sms": 132, "clock_ghz": 1.83, "hbm_gbs": 3350,
                 "source": "H100 whitepaper / datasheet: 3.35 TB/s HBM3, 132 SMs"},
    "H200": {"sms": 132, "clock_ghz": 1.83, "hbm_gbs": 4800,
             "source": "NVIDIA H200 datasheet (https://www.nvidia.com/en-us/data-center/h200/): 4.8 TB/s HBM3e"},
}

PIPES = ("tensor", "fma", "alu", "xu", "lsu", "issue")

# ---------------------------------------------------------------------------------------------------------------
# SASS parsing
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Instr:
    """One SASS instruction: byte address, guard predicate ('' if none), opcode with modifiers, operands."""

    addr: int
    pred: str
    opcode: str
    operands: str

    @property
    def base(self) -> str:
        """The opcode without modifiers (`HGMMA` for `HGMMA.64x128x16.F32.BF16`)."""
        return self.opcode.split(".")[0]


_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Za-z0-9_.]*)\s*([^;]*);")
_FUNC = re.compile(r"^\s*Function\s*:\s*(\S+)")


def parse_sass(text: str) -> Dict[str, List[Instr]]:
    """Instructions of each function in `cuobjdump -sass` output.

    Args:
        text: the disassembly (`cuobjdump -sass file.cubin`), one instruction per line as
            `/*addr*/  [@P0] OPCODE.MODS operands ;`.
    Returns:
        {function name: [Instr, ...] in address order}. Lines that are not instructions are skipped.
    Raises:
        ValueError: no instruction found (not a SASS listing).
    """
    functions: Dict[str, List[Instr]] = {}
    current = None
    for line in text.splitlines():
        m = _FUNC.match(line)
        if m:
            current = functions.setdefault(m.group(1), [])
            continue
        m = _LINE.search(line)
        if m and current is not None:
            current.append(Instr(int(m.group(1), 16), (m.group(2) or "").strip(), m.group(3), m.group(4).strip()))
    if not any(functions.values()):
        raise ValueError("no SASS instructions found (expected `cuobjdump -sass` output)")
    return functions


def find_loops(instrs: Sequence[Instr]) -> List[Tuple[int, int]]:
    """Loops as (first index, last index) of `instrs`: each backward `BRA` and the instruction it jumps to."""
    index = {ins.addr: i for i, ins in enumerate(instrs)}
    loops = []
    for i, ins in enumerate(instrs):
        if ins.base != "BRA":
            continue
        m = re.search(r"0x([0-9a-f]+)", ins.operands)
        if not m:
            continue
        target = int(m.group(1), 16)
        if target <= ins.addr and target in index and index[target] < i:
            loops.append((index[target], i))
    return loops


def find_main_loop(instrs: Sequence[Instr]) -> Optional[Tuple[int, int]]:
    """The main loop: of the loops holding tensor-core instructions, the one with the most MACs per iteration
    (the innermost on ties); without tensor work, the loop with the most instructions. None without loops.

    Inner loops nested in the chosen one are counted once per iteration of it (their trip counts are unknown
    statically); `analyze` reports how many there are.
    """
    loops = find_loops(instrs)
    if not loops:
        return None

    def macs(loop):
        return sum(_mma_macs(ins)[0] for ins in instrs[loop[0]:loop[1] + 1])

    with_mma = [lp for lp in loops if macs(lp) > 0]
    if with_mma:
        return max(with_mma, key=lambda lp: (macs(lp), -(lp[1] - lp[0])))
    return max(loops, key=lambda lp: lp[1] - lp[0])


# ---------------------------------------------------------------------------------------------------------------
# Instruction classes
# ---------------------------------------------------------------------------------------------------------------

_FP32 = {"FADD", "FMUL", "FFMA", "FADD32I", "FMUL32I", "FFMA32I", "HADD2", "HMUL2", "HFMA2", "HFMA2MMA",
         "FSWZADD"}
_IMAD = {"IMAD", "IMUL", "IDP", "IMAD32I", "IMUL32I"}
_ALU = {"IADD3", "IADD", "IADD32I", "VIADD", "VIADDMNMX", "VIMNMX", "IMNMX", "LEA", "LOP3", "LOP", "LOP32I", "SHF",
        "SHL", "SHR", "ISETP", "ICMP", "SEL", "FSEL", "FSETP", "FSET", "FMNMX", "FCHK", "PRMT", "PLOP3", "P2R", "R2P",
        "MOV", "MOV32I", "F2FP", "HSETP2", "HMNMX2", "BMSK", "SGXT", "IABS", "CSET", "CSETP", "VOTE", "FLO"}
_XU = {"MUFU", "F2F", "F2I", "I2F", "I2FP", "F2IP", "FRND", "POPC", "BREV"}
_MEMORY = {"LDG", "STG", "LDS", "STS", "LDSM", "STSM", "LDGSTS", "LDL", "STL", "LD", "ST", "ATOM", "ATOMS",
           "ATOMG", "RED", "REDG", "SHFL", "LDC", "UTMALDG", "UTMASTG", "UBLKCP", "LDTRAM", "MATCH"}
_BARRIERS = {"BAR", "WARPGROUP", "DEPBAR", "LDGDEPBAR", "MEMBAR", "FENCE", "SYNCS", "WARPSYNC", "BSYNC",
             "ARRIVES", "ERRBAR", "CCTL"}
_TENSOR = {"HGMMA", "HMMA", "IMMA", "QGMMA", "IGMMA", "BGMMA"}


def _mma_macs(ins: Instr) -> Tuple[int, str, bool]:
    """(MACs of one tensor instruction, rate key, warpgroup-wide?) or (0, '', False) for other instructions.

    HGMMA.MxNxK is issued by the 4 warps of a warpgroup together and does M*N*K MACs per warpgroup; HMMA.MNK
    (mma.sync, e.g. 16816 = 16x8x16) does M*N*K per warp.
    """
    if ins.base not in _TENSOR:
        return 0, "", False
    mods = ins.opcode.split(".")[1:]
    rate = "tensor_f16"
    if any(m in ("TF32",) for m in mods):
        rate = "tensor_tf32"
    elif any(m in ("E4M3", "E5M2") for m in mods) or ins.base == "QGMMA":
        rate = "tensor_fp8"
    for m in mods:
        g = re.fullmatch(r"(\d+)x(\d+)x(\d+)", m)
        if g:
            a, b, c = (int(v) for v in g.groups())
            return a * b * c, rate, True
        d = re.fullmatch(r"(16)(8)(8|16|32)", m) or re.fullmatch(r"(8)(8)(4)", m)
        if d:
            a, b, c = (int(v) for v in d.groups())
            return a * b * c, rate, False
    return 0, "", False


def _access_bytes(ins: Instr) -> int:
    """Bytes one warp moves through the L1/shared data path for a memory instruction (32 lanes x width)."""
    mods = ins.opcode.split(".")[1:]
    if ins.base in ("LDSM", "STSM"):
        count = next((int(m) for m in mods if m in ("1", "2", "4")), 1)
        return 128 * count  # each 8x8 matrix of 16-bit values is 128 bytes
    width = 4
    for m in mods:
        if m in ("128",):
            width = 16
        elif m in ("64",):
            width = 8
        elif m in ("U16", "S16"):
            width = 2
        elif m in ("U8", "S8"):
            width = 1
    return 32 * width


def classify(ins: Instr) -> str:
    """The pipe class of one instruction: tensor, fma, imad, alu, xu, memory, barrier, uniform, control or other.

    Uniform-datapath instructions (opcodes starting with U, one per warp on a separate scalar pipe) are
    'uniform'; `NOP`, `BRA`, `EXIT`, `S2R` and the like are 'control' (they use an issue slot only).
    """
    base = ins.base
    if base in _TENSOR:
        return "tensor"
    if base in _FP32:
        return "fma"
    if base in _IMAD:
        return "imad"
    if base in _ALU:
        return "alu"
    if base in _XU:
        return "xu"
    if base in _MEMORY:
        return "memory"
    if base in _BARRIERS:
        return "barrier"
    if base.startswith("U") or base in ("R2UR", "S2UR", "VOTEU"):
        return "uniform"
    if base in ("NOP", "BRA", "EXIT", "S2R", "CS2R", "RET", "CALL", "BSSY", "JMP", "BRX", "YIELD", "NANOSLEEP",
                "ELECT", "PMTRIG", "KILL", "BPT", "ACQBULK", "WARPSYNC"):
        return "control"
    return "other"


@dataclasses.dataclass
class LoopCounts:
    """Instruction counts of one loop iteration, per warp (SASS is per-warp code).

    opcodes: Counter of full opcodes; classes: Counter of `classify` classes; macs: tensor MACs per CTA and
    iteration for `num_warps` warps; mma_shapes: Counter of tensor opcodes; lsu_wavefronts: sum over memory
    instructions of max(1, bytes / 128); inner_loops: loops nested in this one (counted once each).
    """

    opcodes: Counter
    classes: Counter
    macs_by_rate: Dict[str, float]
    mma_shapes: Counter
    lsu_wavefronts: float
    instructions: int
    inner_loops: int

    def count(self, prefix: str) -> int:
        """Instructions whose opcode starts with `prefix` (e.g. 'MUFU', 'MUFU.EX2', 'LDGSTS')."""
        return sum(n for op, n in self.opcodes.items() if op == prefix or op.startswith(prefix + "."))


def count_instructions(instrs: Sequence[Instr], num_warps: int, span: Optional[Tuple[int, int]] = None) -> LoopCounts:
    """Counts of `instrs[span[0]:span[1] + 1]` (default all) for a CTA of `num_warps` warps.

    MACs: an HGMMA is one warpgroup's instruction (each of its 4 warps lists it), so a CTA's MACs per listed HGMMA
    are M*N*K * num_warps / 4; an HMMA is per warp, M*N*K * num_warps.
    """
    lo, hi = span if span is not None else (0, len(instrs) - 1)
    body = instrs[lo:hi + 1]
    opcodes: Counter = Counter()
    classes: Counter = Counter()
    shapes: Counter = Counter()
    macs: Dict[str, float] = {}
    wavefronts = 0.0
    for ins in body:
        opcodes[ins.opcode] += 1
        cls = classify(ins)
        classes[cls] += 1
        if cls == "tensor":
            m, rate, warpgroup = _mma_macs(ins)
            shapes[ins.opcode] += 1
            macs[rate] = macs.get(rate, 0.0) + m * (num_warps / 4 if warpgroup else num_warps)
        elif cls == "memory":
            wavefronts += max(1.0, _access_bytes(ins) / 128)
    inner = sum(1 for a, b in find_loops(body) if (a, b) != (0, len(body) - 1))
    return LoopCounts(opcodes, classes, macs, shapes, wavefronts, len(body), inner)


def pipe_cycles(counts: LoopCounts, num_warps: int, rates: Dict[str, Rate] = SM90_RATES) -> Dict[str, float]:
    """Cycles per SM that one CTA's loop iteration needs on each pipe (see the module docstring).

    fma: FP32 ops run on FMAheavy or FMAlite (64 lanes each), IMAD only on FMAheavy, so the pair needs
    max((fp32 + imad) / 128, imad / 64) lanes-cycles; xu includes conversions; lsu is L1/shared wavefronts of
    128 bytes; issue counts every instruction, uniform and control ones too.
    """
    lanes = num_warps * 32
    c = counts.classes
    fma_rate = rates["fma"].value
    return {
        "tensor": sum(m / rates[k].value for k, m in counts.macs_by_rate.items()),
        "fma": max((c["fma"] + c["imad"]) * lanes / fma_rate, c["imad"] * lanes / (fma_rate / 2)),
        "alu": c["alu"] * lanes / rates["alu"].value,
        "xu": c["xu"] * lanes / rates["xu"].value,
        "lsu": counts.lsu_wavefronts * num_warps * 128 / rates["lsu"].value,
        "issue": counts.instructions * num_warps / rates["issue"].value,
    }


def occupancy(registers: int, shared_bytes: int, num_warps: int, rates: Dict[str, Rate] = SM90_RATES) -> int:
    """Resident CTAs per SM: limited by registers (allocated per warp in units of 256), shared memory (plus the
    1 KB the driver reserves per block), warps and blocks per SM (Hopper Tuning Guide; CUDA occupancy rules).
    0 when one CTA does not fit."""
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = int(rates["registers"].value) // (per_warp * num_warps)
    by_smem = int(rates["smem"].value) // (shared_bytes + 1024) if shared_bytes else int(rates["blocks"].value)
    if shared_bytes > rates["smem_block"].value:
        by_smem = 0
    by_warps = int(rates["warps"].value) // num_warps
    return max(0, min(by_regs, by_smem, by_warps, int(rates["blocks"].value)))


@dataclasses.dataclass
class Analysis:
    """The model's view of one compiled kernel: counts of its main loop, cycles per pipe, and resources."""

    function: str
    num_warps: int
    counts: LoopCounts
    cycles: Dict[str, float]
    registers: int
    spill_bytes: int
    shared_bytes: int
    occupancy: int
    loop_found: bool

    @property
    def bound(self) -> str:
        """The pipe with the most cycles per iteration."""
        return max(self.cycles, key=self.cycles.get)

    @property
    def tensor_fraction(self) -> float:
        """Upper bound on the fraction of the tensor rate: tensor cycles / the largest pipe's cycles (0 without
        tensor work)."""
        top = max(self.cycles.values())
        return self.cycles["tensor"] / top if top > 0 else 0.0

    def ratio(self, pipe: str) -> float:
        """Cycles of `pipe` over tensor cycles (inf without tensor work)."""
        t = self.cycles["tensor"]
        return self.cycles[pipe] / t if t > 0 else float("inf")

    def as_dict(self) -> dict:
        """Plain-JSON form: cycles, ratios to the tensor pipe, bound pipe, key counts and resources."""
        c = self.counts
        return {
            "function": self.function, "num_warps": self.num_warps, "loop_found": self.loop_found,
            "cycles": {k: round(v, 2) for k, v in self.cycles.items()},
            "ratios": {k: (round(self.ratio(k), 3) if self.cycles["tensor"] else None) for k in PIPES if k != "tensor"},
            "bound": self.bound, "tensor_fraction": round(self.tensor_fraction, 3),
            "mma": dict(c.mma_shapes), "macs": c.macs_by_rate,
            "counts": {
                "instructions": c.instructions, "mufu": c.count("MUFU"), "mufu_ex2": c.count("MUFU.EX2"),
                "mufu_rcp": c.count("MUFU.RCP"), "mufu_tanh": c.count("MUFU.TANH"),
                "fp32": c.classes["fma"], "imad": c.classes["imad"], "alu": c.classes["alu"], "xu": c.classes["xu"],
                "ldg": c.count("LDG"), "ldgsts": c.count("LDGSTS"), "sts": c.count("STS"), "lds": c.count("LDS"),
                "ldsm": c.count("LDSM"), "ldl_stl": c.count("LDL") + c.count("STL"),
                "barriers": c.classes["barrier"], "uniform": c.classes["uniform"], "inner_loops": c.inner_loops,
            },
            "registers": self.registers, "spill_bytes": self.spill_bytes, "shared_bytes": self.shared_bytes,
            "occupancy": self.occupancy,
        }


def analyze_sass(sass: str, num_warps: int, *, registers: int = 0, spill_bytes: int = 0, shared_bytes: int = 0,
                 function: Optional[str] = None) -> Analysis:
    """Analysis of the main loop of `function` (default: the listing's first function with instructions).

    Args:
        sass: `cuobjdump -sass` text; num_warps: warps per CTA the kernel was compiled for; registers,
            spill_bytes, shared_bytes: resources from `cuobjdump -res-usage` / the compile's metadata.
    Returns:
        An `Analysis`; a kernel without loops is analysed whole (`loop_found` False).
    """
    functions = parse_sass(sass)
    name = function or next(n for n, body in functions.items() if body)
    instrs = functions[name]
    loop = find_main_loop(instrs)
    counts = count_instructions(instrs, num_warps, loop)
    return Analysis(name, num_warps, counts, pipe_cycles(counts, num_warps), registers, spill_bytes, shared_bytes,
                    occupancy(registers, shared_bytes, num_warps), loop is not None)


# ---------------------------------------------------------------------------------------------------------------
# Compiling for sm_90 without a GPU
# ---------------------------------------------------------------------------------------------------------------


def cuobjdump_path() -> str:
    """Triton's bundled cuobjdump (triton/backends/nvidia/bin); raises FileNotFoundError if it is missing."""
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise FileNotFoundError(f"cuobjdump not found at {path} (Triton's NVIDIA backend binaries are missing)")
    return path


def disassemble(cubin: bytes) -> Tuple[str, dict]:
    """(`cuobjdump -sass` text, resources {'REG', 'STACK', 'SHARED', 'LOCAL'}) of a cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        tool = cuobjdump_path()
        sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    res = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage)}
    return sass, res


def _require_compiler() -> None:
    """Raise unless kernels are defined for compiling (not under TRITON_INTERPRET=1)."""
    from sdvae_fast.kernels._common import INTERPRET

    if INTERPRET:
        raise RuntimeError("kernel_report compiles for sm_90 and needs the kernels defined without "
                           "TRITON_INTERPRET=1; run it in a process without that variable (`sdvae-fast "
                           "kernel-report` re-runs itself so)")


def compile_for_sm90(fn, args: Sequence, constexprs: dict, num_warps: int, num_stages: int, arch: int = 90):
    """Compile JIT function `fn` for sm_`arch` as Triton's JIT would for these arguments (its own binder decides
    the specialisation), and return the compiled kernel (asm['cubin'], metadata.shared, ...).

    args: the runtime (non-constexpr) arguments in the kernel's parameter order (tensors may be on the meta
    device; only dtype and data_ptr alignment are read); constexprs: the constexpr keyword arguments.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(constexprs, num_warps=num_warps, num_stages=num_stages)
    runtime = [p.name for p in fn.params if not p.is_constexpr]
    bound, specialization, options = binder(**dict(zip(runtime, args)), **kwargs)  # by name: constexprs interleave
    options, signature, consts, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, consts, attrs), target=target, options=options.__dict__)


# ---------------------------------------------------------------------------------------------------------------
# Recording the launches of the kernels' launchers
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Launch:
    """One recorded kernel launch: the JIT function, its arguments, and the tile configs it may run with."""

    name: str
    fn: object
    args: tuple
    constexprs: dict
    configs: List[Tuple[dict, int, int]]  # (tile constexprs, num_warps, num_stages)
    named: dict

    def specialization_key(self, config_index: int = 0) -> tuple:
        """What decides the compiled code: dtypes and 16-alignment of tensors, ==1 / %16 of integers, the
        constexprs and the config."""
        spec = []
        for a in self.args:
            if hasattr(a, "data_ptr"):
                spec.append((str(a.dtype), a.data_ptr() % 16 == 0))
            elif isinstance(a, bool) or not isinstance(a, int):
                spec.append(type(a).__name__)
            else:
                spec.append(("i", a == 1, a % 16 == 0))
        return (self.name, tuple(spec), tuple(sorted(self.constexprs.items())))


def _split_arguments(fn, args: Sequence, kwargs: dict) -> Tuple[tuple, dict]:
    """(runtime arguments in the kernel's parameter order, constexpr keyword arguments) of a launch that may pass
    runtime arguments by keyword (the conv launcher passes its second source `x2_ptr=...` so). A runtime
    parameter skipped between passed ones takes its default."""
    named = dict(zip([p.name for p in fn.params], args))
    named.update({k: v for k, v in kwargs.items()})
    runtime = [p for p in fn.params if not p.is_constexpr]
    last = max((i for i, p in enumerate(runtime) if p.name in named), default=-1)
    values = []
    for p in runtime[:last + 1]:
        if p.name not in named and not p.has_default:
            raise ValueError(f"launch of {fn.__name__} misses its argument {p.name!r}")
        values.append(named.get(p.name, p.default))
    taken = {p.name for p in runtime}
    return tuple(values), {k: v for k, v in kwargs.items() if k not in taken}


class _Recorder:
    """Stands in for a jitted or autotuned kernel: `kernel[grid](*args, **kw)` records a `Launch`."""

    def __init__(self, name: str, fn, configs, sink: list):
        self.name, self.fn, self.configs, self.sink = name, fn, configs, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            kwargs = dict(kwargs)
            warps = kwargs.pop("num_warps", None)
            stages = kwargs.pop("num_stages", None)
            names = [p.name for p in self.fn.params]
            named = dict(zip(names, args), **kwargs)
            tile_names = set()
            configs = []
            if self.configs:
                for c in self.configs:
                    tile_names |= set(c.kwargs)
                    configs.append((dict(c.kwargs), c.num_warps, c.num_stages))
            else:
                configs.append(({}, warps or 4, stages or 3))
            args, constexprs = _split_arguments(self.fn, args, kwargs)
            constexprs = {k: v for k, v in constexprs.items() if k not in tile_names}
            self.sink.append(Launch(self.name, self.fn, args, constexprs, configs, named))
        return launch


def _kernel_modules():
    """The kernel modules of `sdvae_fast.kernels` (imported)."""
    import pkgutil

    import sdvae_fast.kernels as pkg

    return [importlib.import_module(f"{pkg.__name__}.{m.name}") for m in pkgutil.iter_modules(pkg.__path__)]


class _LaunchHook:
    """The `kernels._common.RECORDER` protocol: `launch(kernel, grid, args, kwargs)` records instead of running,
    `shared_memory` is the target's per-block limit (autotune pruning reads it)."""

    shared_memory = int(SM90_RATES["smem_block"].value)

    def __init__(self, sink: list):
        self.sink = sink

    def launch(self, kernel, grid, args, kwargs):
        """Record `kernel[grid](*args, **kwargs)` (kernel: a recorder, an autotuner or a JIT function)."""
        if not isinstance(kernel, _Recorder):
            fn = getattr(kernel, "fn", kernel) if hasattr(kernel, "configs") else kernel
            kernel = _Recorder(getattr(fn, "__name__", str(fn)), fn, getattr(kernel, "configs", None), self.sink)
        kernel[grid](*args, **kwargs)


@contextlib.contextmanager
def record_launches(sink: list):
    """Within the block, every Triton kernel of `sdvae_fast.kernels` records its launches into `sink` instead of
    running, and the launchers accept meta tensors (which cost nothing). Autotuned kernels record their candidate
    configs; `attention._autotuned_kernel` records `attention_configs` of the head dim.

    Launches through `kernels._common.launch` go to its `RECORDER` hook (when the installed tree has one);
    kernels launched directly (`kernel[grid](...)`) are swapped for recorders in their modules' namespaces.
    """
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    from sdvae_fast.kernels import _common

    saved = []

    def patch(module, name, value):
        saved.append((module, name, getattr(module, name)))
        setattr(module, name, value)

    try:
        if hasattr(_common, "RECORDER"):
            patch(_common, "RECORDER", _LaunchHook(sink))
        for module in _kernel_modules():
            for name, value in list(vars(module).items()):
                if isinstance(value, Autotuner):
                    patch(module, name, _Recorder(name, value.fn, value.configs, sink))
                elif isinstance(value, JITFunction):
                    patch(module, name, _Recorder(name, value, None, sink))
                elif name == "require_kernels":
                    patch(module, name, lambda *a, **k: None)
            if hasattr(module, "_autotuned_kernel") and hasattr(module, "attention_configs"):
                fn = getattr(module, "_attention_fwd_kernel")
                fn = fn.fn if isinstance(fn, _Recorder) else fn
                configs_of = module.attention_configs
                patch(module, "_autotuned_kernel",
                      lambda block_d, fn=fn, configs_of=configs_of: _Recorder("_attention_fwd_kernel", fn,
                                                                             configs_of(block_d), sink))
        yield sink
    finally:
        for module, name, value in reversed(saved):
            setattr(module, name, value)


# ---------------------------------------------------------------------------------------------------------------
# The VAE's launches (until a recorded plan of a real run is available)
# ---------------------------------------------------------------------------------------------------------------

#: SD VAE (block_out_channels 128, 256, 512, 512; 32 groups; latent 4 channels): every launch kind of the fast
#: path's units (sdvae_fast/fast.py), as (label, op, keyword arguments). Sizes are per image at a 256^2 image
#: (latent 32^2); only divisibility by 16 of the sizes enters the compiled code, and every VAE size is so
#: divisible, so these compile exactly like 1024^2 or 4096^2 launches.
VAE_LAUNCHES = [
    ("dec conv_in 3x3 4->512 +stats", "conv", dict(c_in=4, c_out=512, hw=32, k=3, emit=True)),
    ("resnet conv1 GSC 3x3 512->512 +stats", "conv", dict(c_in=512, c_out=512, hw=32, k=3, gn=True, emit=True)),
    ("resnet conv2 GSC 3x3 512->512 +res +stats", "conv",
     dict(c_in=512, c_out=512, hw=32, k=3, gn=True, residual=True, emit=True)),
    ("resnet conv1 GSC 3x3 512->256 +stats", "conv", dict(c_in=512, c_out=256, hw=128, k=3, gn=True, emit=True)),
    ("resnet conv2 GSC 3x3 128->128 +res +stats", "conv",
     dict(c_in=128, c_out=128, hw=256, k=3, gn=True, residual=True, emit=True)),
    ("resnet shortcut 1x1 512->256", "conv", dict(c_in=512, c_out=256, hw=128, k=1)),
    ("attention qkv GN 1x1 512->1536", "conv", dict(c_in=512, c_out=1536, hw=32, k=1, gn=True, silu=False)),
    ("attention out-proj 1x1 512->512 +res +stats", "conv",
     dict(c_in=512, c_out=512, hw=32, k=1, residual=True, emit=True)),
    ("upsample 4-phase 512->512 +stats", "upsample", dict(c_in=512, c_out=512, hw=32, emit=True)),
    ("dec out GSC 3x3 128->3", "conv", dict(c_in=128, c_out=3, hw=256, k=3, gn=True)),
    ("post_quant_conv 1x1 4->4", "conv", dict(c_in=4, c_out=4, hw=32, k=1)),
    ("enc conv_in 3x3 3->128 +stats", "conv", dict(c_in=3, c_out=128, hw=256, k=3, emit=True)),
    ("enc downsample 3x3 s2 128->128 +stats", "conv",
     dict(c_in=128, c_out=128, hw=256, k=3, stride=2, padding=(0, 1, 0, 1), emit=True)),
    ("enc out GSC 3x3 512->8 (quant folded)", "conv", dict(c_in=512, c_out=8, hw=32, k=3, gn=True)),
    ("mid attention D=512", "attention", dict(n=1024, d=512)),
    ("GroupNorm statistics pass 512ch", "stats", dict(c=512, hw=32)),
]

_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _meta_image(c: int, hw: int, dtype):
    import torch

    return torch.empty(1, c, hw, hw, device="meta", dtype=dtype).contiguous(memory_format=torch.channels_last)


def run_launch(op: str, spec: dict, dtype) -> None:
    """Call the launcher for one `VAE_LAUNCHES` entry on meta tensors of `dtype` (inside `record_launches`)."""
    import torch

    from sdvae_fast.kernels import attention, conv, group_norm

    meta = dict(device="meta", dtype=dtype)
    if op == "conv":
        c_in, c_out, hw, k = spec["c_in"], spec["c_out"], spec["hw"], spec["k"]
        stride = spec.get("stride", 1)
        padding = spec.get("padding", (k // 2,) * 4)
        x = _meta_image(c_in, hw, dtype)
        gn = spec.get("gn", False)
        scale = torch.empty(1, c_in, device="meta") if gn else None
        h_out = (hw + padding[2] + padding[3] - k) // stride + 1
        residual = _meta_image(c_out, h_out, dtype) if spec.get("residual") else None
        conv.gn_silu_conv2d(x, torch.empty(c_out, c_in, k, k, **meta), torch.empty(c_out, **meta), scale, scale,
                            residual, silu=spec.get("silu", True), stride=stride, padding=padding,
                            stats_groups=32 if spec.get("emit") else 0)
    elif op == "upsample":
        x = _meta_image(spec["c_in"], spec["hw"], dtype)
        conv.upsample_conv2d(x, torch.empty(spec["c_out"], spec["c_in"], 3, 3, **meta),
                             torch.empty(spec["c_out"], **meta), stats_groups=32 if spec.get("emit") else 0)
    elif op == "attention":
        n, d = spec["n"], spec["d"]
        qkv = torch.empty(1, n, 3 * d, **meta)  # the fused projection's channels_last output, split
        q, k, v = qkv.split(d, dim=-1)
        attention.attention_forward(q, k, v)
    elif op == "stats":
        group_norm.group_norm_stats(_meta_image(spec["c"], spec["hw"], dtype), 32, 1e-6)
    else:
        raise ValueError(f"unknown launch op {op!r}")


@dataclasses.dataclass
class Variant:
    """One compiled kernel variant: a distinct specialisation of a kernel, the VAE launches that use it, and the
    tile configs it may run with."""

    kernel: str
    labels: List[str]
    launch: Launch
    dtype: str

    @property
    def family(self) -> str:
        """gsc conv / plain conv / upsample conv / attention / gn statistics / gn merge."""
        c = self.launch.constexprs
        if self.kernel == "_conv_kernel":
            if c.get("UPSAMPLE_2X"):
                return "upsample conv"
            return "gsc conv" if c.get("APPLY_GN") else "plain conv"
        if "attention" in self.kernel:
            return "attention"
        if "merge" in self.kernel:
            return "gn merge"
        return "gn statistics"


def collect_variants(launches: Iterable[Tuple[str, str, dict]] = VAE_LAUNCHES, dtypes: Sequence[str] = ("bf16",),
                     only: Optional[Callable[[str], bool]] = None) -> List[Variant]:
    """Record the launches of `launches` for each dtype and merge identical specialisations into variants.

    Args:
        launches: (label, op, spec) entries like `VAE_LAUNCHES`; dtypes: 'bf16', 'fp16', 'fp32';
        only: optional filter on labels.
    Returns:
        Variants in first-seen order, each with the labels of every launch that compiles to it.
    """
    import torch

    variants: Dict[tuple, Variant] = {}
    for dt in dtypes:
        dtype = getattr(torch, _DTYPES[dt])
        for label, op, spec in launches:
            if only is not None and not only(label):
                continue
            sink: list = []
            with record_launches(sink):
                run_launch(op, spec, dtype)
            for launch in sink:
                key = (dt,) + launch.specialization_key()
                if key in variants:
                    variants[key].labels.append(label)
                else:
                    variants[key] = Variant(launch.name, [label], launch, dt)
    return list(variants.values())


_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
_TILES = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_DK", "BLOCK_DV", "DV_CHUNKS")


def _plan_spec(name: str, named: dict, constexprs: dict) -> Tuple[str, dict]:
    """(label, launch spec as in `VAE_LAUNCHES`) of a recorded plan launch, from its arguments."""
    if name == "_conv_kernel":
        up = bool(constexprs.get("UPSAMPLE_2X"))
        spec = dict(c_in=int(named["C_in"]), c_out=int(named["C_out"]), k=int(constexprs["KH"]),
                    gn=bool(constexprs.get("APPLY_GN")), silu=bool(constexprs.get("APPLY_SILU")),
                    residual=bool(constexprs.get("HAS_RESIDUAL")), emit=bool(constexprs.get("EMIT_STATS")))
        parts = ["upsample 4-phase" if up else f"{'GSC' if spec['gn'] else 'conv'} {spec['k']}x{spec['k']}"]
        parts.append(f"{spec['c_in']}->{spec['c_out']}")
        parts += [t for t, on in (("no SiLU", spec["gn"] and not spec["silu"]), ("+res", spec["residual"]),
                                  ("+stats", spec["emit"])) if on]
        return " ".join(parts), dict(op="upsample" if up else "conv", **spec)
    if name == "_attention_fwd_kernel":
        return f"attention D={constexprs.get('HEAD_DIM')}", dict(op="attention", d=constexprs.get("HEAD_DIM"))
    return name, dict(op="stats")


def plan_variants(path: str, sections: Optional[Sequence[str]] = None, dtypes: Optional[Sequence[str]] = None
                  ) -> Tuple[List[Variant], Dict[str, dict]]:
    """Variants of a recorded launch plan (`sdvae_fast.warmup.record_plan`, e.g. bench/gpu_plan.json, section
    'e2e' for the real encode/decode), each with the one config it was recorded with.

    Returns (variants, {label: launch spec}); variants with equal specialisation and config are merged.
    dtypes: keep only launches whose first tensor argument has one of these ('bf16', 'fp16', 'fp32').
    """
    from sdvae_fast import warmup

    launches, _ = warmup.load_plan(path, sections)
    names = {v: k for k, v in _DTYPES.items()}
    merged: Dict[tuple, Variant] = {}
    specs: Dict[str, dict] = {}
    for rec in launches:
        fn = warmup._jit_function(rec.kernel)
        args, kwargs = _split_arguments(fn, [warmup._decode_value(a, "meta") for a in rec.args],
                                        {k: warmup._decode_value(v, "meta") for k, v in rec.kwargs.items()})
        dtype = next((names.get(str(a.dtype).replace("torch.", "")) for a in args if hasattr(a, "dtype")), None)
        if dtypes and dtype not in dtypes:
            continue
        options = {k: v for k, v in kwargs.items() if k in _OPTIONS}
        tiles = {k: v for k, v in kwargs.items() if k in _TILES}
        constexprs = {k: v for k, v in kwargs.items() if k not in _OPTIONS and k not in _TILES}
        config = (tiles, int(options.get("num_warps", 4)), int(options.get("num_stages", 3)))
        name = rec.kernel.partition(":")[2]
        named = dict(zip([p.name for p in fn.params if not p.is_constexpr], args), **constexprs)
        label, spec = _plan_spec(name, named, constexprs)
        specs[label] = spec
        launch = Launch(name, fn, args, constexprs, [config], named)
        key = (dtype, config_label(config)) + launch.specialization_key()
        if key in merged:
            if label not in merged[key].labels:
                merged[key].labels.append(label)
        else:
            merged[key] = Variant(name, [label], launch, dtype or "?")
    return list(merged.values()), specs


def candidate_configs(variant: Variant, which: str = "all") -> List[Tuple[dict, int, int]]:
    """The tile configs the autotuner would time for this variant: for the conv kernel those of
    `conv.configs_for_width` for its C_out; 'default' keeps the first only."""
    from sdvae_fast.kernels import conv

    configs = variant.launch.configs
    if variant.kernel == "_conv_kernel" and hasattr(conv, "configs_for_width"):
        allowed = conv.configs_for_width(conv.CONV_CONFIGS, int(variant.launch.named["C_out"]))
        wanted = [(dict(c.kwargs), c.num_warps, c.num_stages) for c in allowed]
        configs = [c for c in configs if c in wanted] or configs
    return configs[:1] if which == "default" else configs


def config_label(config: Tuple[dict, int, int]) -> str:
    """'128x128x64 w8 s3' for conv tiles, the tile values joined by x otherwise; '' for a kernel without tiles."""
    tiles, warps, stages = config
    if not tiles:
        return f"w{warps}"
    return "x".join(str(v) for v in tiles.values()) + f" w{warps} s{stages}"


def analyze_variant(variant: Variant, config: Tuple[dict, int, int], arch: int = 90) -> Analysis:
    """Compile one variant with one config for sm_`arch` and analyse its SASS."""
    _require_compiler()
    tiles, warps, stages = config
    launch = variant.launch
    kernel = compile_for_sm90(launch.fn, launch.args, dict(launch.constexprs, **tiles), warps, stages, arch)
    sass, res = disassemble(kernel.asm["cubin"])
    return analyze_sass(sass, warps, registers=res.get("REG", 0), spill_bytes=res.get("STACK", 0),
                        shared_bytes=max(int(kernel.metadata.shared), res.get("SHARED", 0)))


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------


def useful_macs(variant: Variant, config: Tuple[dict, int, int]) -> Optional[int]:
    """MACs one main-loop iteration of a CTA needs by the algorithm (None where not modelled): conv
    BLOCK_M * BLOCK_N * BLOCK_K; attention (one K/V step) BLOCK_M * BLOCK_N * (QK^T depth) + BLOCK_M * BLOCK_DV *
    DV_CHUNKS * BLOCK_N. More executed than useful MACs means warpgroups repeat work (a layout that broadcasts a
    tile)."""
    t = config[0]
    if variant.kernel == "_conv_kernel":
        return t["BLOCK_M"] * t["BLOCK_N"] * t["BLOCK_K"]
    if variant.kernel == "_attention_fwd_kernel":
        depth = -(-int(variant.launch.constexprs["HEAD_DIM"]) // t["BLOCK_DK"]) * t["BLOCK_DK"]
        return t["BLOCK_M"] * t["BLOCK_N"] * (depth + t["BLOCK_DV"] * t.get("DV_CHUNKS", 1))
    return None


def build_report(dtypes: Sequence[str] = ("bf16",), configs: str = "all", only: Optional[Callable[[str], bool]] = None,
                 launches=VAE_LAUNCHES, progress: Optional[Callable[[str], None]] = None,
                 plan: Optional[str] = None, sections: Optional[Sequence[str]] = None) -> List[dict]:
    """Rows of the report: one per (variant, candidate config), as JSON-ready dicts.

    Each row: kernel, family, dtype, labels (the launches using it), config, and `Analysis.as_dict()` (cycles
    per pipe per iteration, ratios to the tensor pipe, bound pipe, tensor fraction, counts, registers, spills,
    shared memory, occupancy). Needs the kernels defined without TRITON_INTERPRET (see `main`).
    """
    _require_compiler()
    if plan:
        variants, specs = plan_variants(plan, sections, dtypes)
        variants = [v for v in variants if only is None or any(map(only, v.labels))]
    else:
        specs = {label: dict(op=op, **spec) for label, op, spec in launches}
        variants = collect_variants(launches, dtypes, only)
    rows = []
    for variant in variants:
        for config in (variant.launch.configs if plan else candidate_configs(variant, configs)):
            if progress:
                progress(f"{variant.kernel} {variant.dtype} {config_label(config)}: {variant.labels[0]}")
            analysis = analyze_variant(variant, config)
            row = dict(kernel=variant.kernel, family=variant.family, dtype=variant.dtype, labels=variant.labels,
                       config=config_label(config), **analysis.as_dict())
            useful = useful_macs(variant, config)
            executed = sum(analysis.counts.macs_by_rate.values())
            row["launches"] = [specs[label] for label in variant.labels]
            row["useful_macs"] = useful
            row["executed_over_useful"] = round(executed / useful, 3) if useful and executed else None
            rows.append(row)
    return rows


def load_rows(path: str) -> List[dict]:
    """Rows of a report written with `--json` (docs/kernel_report.json holds the committed one)."""
    with open(path) as f:
        return json.load(f)


def ceiling_for(rows: Sequence[dict], op: str, dtype: str = "bf16", **match) -> Optional[dict]:
    """The model's best case for a launch kind: of the rows whose variant serves a launch with `op` ('conv',
    'upsample', 'attention', 'stats') and every `match` item (e.g. k=3, gn=True, residual=True; a missing key
    counts as False), the row with the highest tensor fraction. None when no row matches. The GPU benchmark
    prints its `tensor_fraction` and `config` beside measured times (bench/bench_conv.py)."""
    def fits(launch):
        return launch["op"] == op and all(launch.get(k, False) == v for k, v in match.items())

    found = [r for r in rows if r["dtype"] == dtype and r["cycles"]["tensor"] and any(map(fits, r["launches"]))]
    return max(found, key=lambda r: r["tensor_fraction"]) if found else None


def gsc_alternatives(c_in: int, c_out: int, side: int, k: int, fused_fraction: float, plain_fraction: float,
                     elem_bytes: int = 2, device: str = "H200") -> dict:
    """Model times (microseconds) of one GSC unit (GroupNorm+SiLU+conv, stride 1, batch 1) done two ways.

    fused: the conv kernel with the prologue, at `fused_fraction` of the dense tensor rate;
    separate: a GroupNorm+SiLU pass that reads x and writes the normalised tensor once (2 * C_in * side^2 *
    elem_bytes bytes at the HBM rate, a bound that assumes the pass itself is memory-bound), then a plain conv at
    `plain_fraction`. Tensor rate: 2048 MAC/clk/SM (`SM90_RATES`) x SMs x clock of `DEVICES[device]`.
    Returns {'macs', 'fused_us', 'conv_us', 'pass_us', 'separate_us', 'best'}.
    """
    dev = DEVICES[device]
    macs = float(k * k * c_in * c_out * side * side)
    peak = SM90_RATES["tensor_f16"].value * dev["sms"] * dev["clock_ghz"] * 1e9  # MAC/s
    fused = macs / (peak * fused_fraction) * 1e6
    conv = macs / (peak * plain_fraction) * 1e6
    traffic = 2.0 * c_in * side * side * elem_bytes
    pass_us = traffic / (dev["hbm_gbs"] * 1e9) * 1e6
    separate = conv + pass_us
    return {"macs": macs, "fused_us": fused, "conv_us": conv, "pass_us": pass_us, "separate_us": separate,
            "best": "fused" if fused <= separate else "separate"}


def _fmt(v, digits=2) -> str:
    return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def markdown_table(rows: Sequence[dict]) -> str:
    """The report as a markdown table: per row the launch(es), config, cycles ratios to the tensor pipe, bound
    pipe, tensor fraction, MUFU/FP32/ALU counts per warp and iteration, registers, spills, shared memory (KiB)
    and CTAs per SM. Kernels without tensor work show absolute cycles instead of ratios."""
    head = ("| variant (launches) | dtype | config | xu/T | fma/T | alu/T | lsu/T | issue/T | bound | tensor frac "
            "| MACs run/needed | MUFU | FP32 | ALU | instr | regs | spill B | smem KiB | CTAs/SM |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ratios = r["ratios"]
        if r["cycles"]["tensor"]:
            cells = [_fmt(ratios[p]) for p in ("xu", "fma", "alu", "lsu", "issue")]
        else:
            cells = [f"{r['cycles'][p]:.0f} cyc" for p in ("xu", "fma", "alu", "lsu", "issue")]
        labels = r["labels"][0] if r["kernel"] == "_conv_kernel" else f"{r['kernel']} ({r['labels'][0]})"
        labels += f" (+{len(r['labels']) - 1})" if len(r["labels"]) > 1 else ""
        c = r["counts"]
        lines.append("| " + " | ".join([
            labels, r["dtype"], r["config"], *cells, r["bound"], _fmt(r["tensor_fraction"]),
            _fmt(r.get("executed_over_useful")), str(c["mufu"]),
            str(c["fp32"]), str(c["alu"]), str(c["instructions"]), str(r["registers"]), str(r["spill_bytes"]),
            f"{r['shared_bytes'] / 1024:.0f}", str(r["occupancy"])]) + " |")
    return "\n".join(lines) + "\n"


def rates_table(rates: Dict[str, Rate] = SM90_RATES) -> str:
    """The per-SM rates the model uses, with their sources, as a markdown table."""
    lines = ["| rate | per clock per SM | unit | source |", "|---|---|---|---|"]
    for k, r in rates.items():
        lines.append(f"| {k} | {r.value:g} | {r.unit} | {r.source} |")
    return "\n".join(lines) + "\n"


def best_rows(rows: Sequence[dict]) -> List[dict]:
    """Per (kernel, first launch label, dtype) the candidate config with the highest tensor fraction (what a
    perfect autotuner would pick by the model), in first-seen order."""
    best: Dict[tuple, dict] = {}
    for r in rows:
        key = (r["kernel"], r["labels"][0], r["dtype"])
        if key not in best or r["tensor_fraction"] > best[key]["tensor_fraction"]:
            best[key] = r
    return list(best.values())


def plot(rows: Sequence[dict], path: str) -> None:
    """PNG bar chart (matplotlib): for the best config of each tensor-core variant (`best_rows`), each
    non-tensor pipe's cycles relative to the tensor pipe, with the 0.6 headroom line and 1.0 (the tensor pipe)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in best_rows(rows) if r["cycles"]["tensor"]]
    pipes = ("xu", "fma", "alu", "lsu", "issue")
    fig, ax = plt.subplots(figsize=(min(24, max(8, 0.55 * len(rows) + 3)), 6.5))
    width = 0.8 / len(pipes)
    for i, p in enumerate(pipes):
        ax.bar([j + i * width for j in range(len(rows))], [r["ratios"][p] for r in rows], width, label=p)
    ax.axhline(1.0, color="k", lw=1, label="tensor pipe")
    ax.axhline(0.6, color="r", lw=1, ls="--", label="0.6 headroom")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))])
    ax.set_xticklabels([f"{r['labels'][0][:34]}\n{r['dtype']} {r['config']}" for r in rows], rotation=80, fontsize=6)
    ax.set_ylabel("pipe cycles / tensor cycles per loop iteration (sm_90)")
    ax.set_yscale("log")
    ax.set_title("Static cost model: non-tensor pipes relative to the tensor pipe")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`sdvae-fast kernel-report`: compile every variant the VAE launches for sm_90 and print the cost model.

    Re-runs itself in a child process without TRITON_INTERPRET when that is set (the kernels must be defined for
    compiling). Exit code 0, or 2 on a bad argument / missing toolchain.
    """
    parser = argparse.ArgumentParser(
        prog="sdvae-fast kernel-report",
        description="Static cost model of the Triton kernels on Hopper from their sm_90 SASS (no GPU needed): "
                    "per variant and autotune candidate, cycles per pipe per main-loop iteration relative to the "
                    "tensor pipe, the bound pipe, the fraction of the tensor rate it allows, registers, spills, "
                    "shared memory and CTAs per SM. Rates and their sources: docs/cost_model.md.")
    parser.add_argument("--target", default="sm_90", choices=["sm_90"], help="GPU architecture (only sm_90)")
    parser.add_argument("--dtype", nargs="+", default=["bf16"], choices=sorted(_DTYPES),
                        help="activation dtypes to compile for (default bf16)")
    parser.add_argument("--configs", default="all", choices=["all", "default"],
                        help="every autotune candidate of each variant, or the default (first) one")
    parser.add_argument("--only", metavar="TEXT", help="only launches whose label contains TEXT")
    parser.add_argument("--plan", metavar="JSON",
                        help="read the variants from a recorded launch plan (`sdvae-fast warmup`, e.g. "
                             "bench/gpu_plan.json) instead of the built-in list of the VAE's launch kinds")
    parser.add_argument("--section", nargs="+", default=["e2e"],
                        help="plan sections to read (default e2e: a real encode and decode)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    parser.add_argument("--markdown", metavar="FILE", help="also write the table (and the rates) as markdown")
    parser.add_argument("--png", metavar="FILE", help="also write the chart (matplotlib)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, "-m", "sdvae_fast.kernel_report", *argv], env=env)
    only = (lambda label: args.only in label) if args.only else None
    progress = None if args.quiet else (lambda s: print(f"compiling {s}", file=sys.stderr, flush=True))
    try:
        rows = build_report(args.dtype, args.configs, only, progress=progress, plan=args.plan,
                            sections=args.section if args.plan else None)
    except FileNotFoundError as exc:
        print(f"sdvae-fast kernel-report: error: {exc}", file=sys.stderr)
        return 2
    table = markdown_table(rows)
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("# sm_90 static cost model\n\n" + table + "\n## Rates\n\n" + rates_table())
    if args.png:
        plot(rows, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
