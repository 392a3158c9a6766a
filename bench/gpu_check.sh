#!/usr/bin/env bash
# The prepared GPU check of sdvae-fast, within 6 minutes of wall time on one H200 with an empty Triton cache and no
# network: environment, a parallel warmup of every kernel variant the sections need (bench/gpu_plan.json), the
# correctness sections (GPU tests with every surviving autotune config, parity, the 4096^2 and batch-32 decodes),
# then the timing sections (conv and attention kernels, end to end). Results go to bench/results/DATE-GPU.md (+ logs,
# .csv, .png, the autotune table) and, when $OUT is set, to $OUT too (the only folder that comes back from a
# borrowed machine): the report and one tarball of everything, rewritten as each section ends.
#
# The GPU machine (Python 3.12) has no network; it holds torch, triton, numpy, safetensors, scikit-image, tqdm and
# setuptools but not diffusers (the e2e section's peer and the tests' reference). So the recipe has two steps.
# 1. Once, on a machine with network, in the repo root: download the diffusers wheel for the GPU machine's Python
#    (3.12) into .whl/ (gitignored):
#      python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#          -d .whl diffusers==0.42.1
# 2. On the GPU machine, in the repo root, with .whl/ copied along (for the device `run` tool: carry [".whl"],
#    timeout_s 480): install that wheel into a private folder, install this package in place, run this script with
#    the commit (the tree arrives without .git):
#      python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site \
#          && python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . \
#          && bash bench/gpu_check.sh --commit "$(git rev-parse --short=12 HEAD)"   # run the git part here
#
# Usage: bash bench/gpu_check.sh [--commit SHA]
# Environment:
#   OUT          also copy the report and a tarball of every result there (set by the device machine)
#   SECTIONS     the sections to run, space separated
#                (default: "env warmup tests parity big conv attention e2e"; "coldstart", not in the default,
#                times an empty cache to the first 1024^2 decode with and without warmup: about 2 more minutes;
#                "pp", not in the default either, is issue 12's patch-parallel scaling of a 4096^2 bf16 decode
#                (bench/pp_bench.py): the 1-GPU baseline without a process group, then one rank per GPU (as
#                many as `nvidia-smi -L` lists, at most 8) under torch.distributed.run, each with a correctness
#                check, median ms, peak GiB and communication share per rank, appended to DATE-GPU-pp.md; time
#                box 240 s, most of it for compiles when the warmup has not run: SECTIONS="env warmup pp";
#                "consistency", not in the default either, is issue 13's consistency-decoder benchmark
#                (bench/bench_consistency.py): the 2-step bf16 decode at 512^2 and 1024^2 of ours against diffusers
#                eager and torch.compile, checked against fp32 first, with the FLOP floor (the fraction of a
#                measured bf16 matmul rate), to DATE-GPU-consistency.json and .md; it compiles its own kernels in
#                parallel first (the warmup section's plan does not cover them); time box 480 s, more than the
#                default budget leaves: SECTIONS="env consistency" BUDGET_S=500, device timeout_s 590;
#                "quantize", not in the default either, is issue 14's VQ quantiser benchmark
#                (bench/bench_quantize.py): ops.vector_quantize against cdist + argmin + gather (diffusers'
#                arithmetic) at a 16384-entry codebook, D x latent side 4x128, 32x128, 256x64, 256x128, fp32 and
#                bf16, codes checked against the exact nearest first, then peak memory and do_bench median ms, to
#                DATE-GPU-quantize.json and .md; time box 120 s: SECTIONS="env quantize";
#                "flux2", not in the default either, is issue 14's FLUX.2 VAE benchmark (bench/bench_flux2.py):
#                the 1024^2 bf16 decode of presets flux2 and flux2-small, ours against diffusers eager and
#                torch.compile of diffusers' decode, checked against fp32 first, with TFLOP/s and the fraction of
#                a measured bf16 matmul rate, to DATE-GPU-flux2.json and .md; it compiles its own kernels in
#                parallel first; time box 420 s, most of it torch.compile's two compiles:
#                SECTIONS="env flux2" BUDGET_S=440, device timeout_s 560; both: SECTIONS="env quantize flux2"
#                BUDGET_S=560, device timeout_s 590, flux2 then gets what quantize leaves)
#   RESULTS_DIR  where results are written (default: bench/results)
#   BUDGET_S     total seconds for all sections (default 340); each section also has its own time box
#   PYTHON       the interpreter (default: python3)
#   SDVAE_FAST_COMMIT  the commit to record when --commit is not given and there is no .git
set -uo pipefail
cd "$(dirname "$0")/.."

while [ $# -gt 0 ]; do
    case $1 in
        --commit) export SDVAE_FAST_COMMIT=$2; shift 2 ;;
        --commit=*) export SDVAE_FAST_COMMIT=${1#--commit=}; shift ;;
        *) echo "usage: bash bench/gpu_check.sh [--commit SHA]" >&2; exit 2 ;;
    esac
done

PY=${PYTHON:-python3}
SECTIONS=${SECTIONS:-"env warmup tests parity big conv attention e2e"}
RESULTS=${RESULTS_DIR:-bench/results}
BUDGET_S=${BUDGET_S:-340}
# One Triton cache for the warmup and every section; each section reports the compiles it still caused.
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$HOME/.triton/cache}
mkdir -p "$RESULTS"
# The autotune table the warmup settles (and every later process applies), kept with the results.
export SDVAE_FAST_AUTOTUNE_TABLE=${SDVAE_FAST_AUTOTUNE_TABLE:-$(cd "$RESULTS" && pwd)/autotune-table.json}
# The test conftest turns the Triton interpreter on unless told otherwise: on a GPU the kernels must compile.
export TRITON_INTERPRET=0
export PYTHONUNBUFFERED=1

mkdir -p "$RESULTS"
STEM=$("$PY" -m sdvae_fast.bench stem) || STEM="$(date -u +%Y-%m-%d)-unknown"
REPORT="$RESULTS/$STEM.md"
START=$(date +%s)

# Copy this run's results to $OUT (when set): the report itself plus one tarball of everything, since a borrowed
# machine returns at most 8 files.
publish() {
    if [ -n "${OUT:-}" ]; then
        mkdir -p "$OUT"
        cp "$REPORT" "$OUT/" 2>/dev/null || true
        cp "$SDVAE_FAST_AUTOTUNE_TABLE" "$RESULTS/$STEM-autotune.json" 2>/dev/null || true
        (cd "$RESULTS" && tar czf "$OUT/$STEM-results.tar.gz" "$STEM"*) 2>/dev/null || true
    fi
}

# section NAME LIMIT_S COMMAND...: run COMMAND under `timeout`, log to DATE-GPU-NAME.log, append a summary and
# the log's tail to the report, publish. A section is skipped when less than 10 s of the total budget remain.
section() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET_S - ($(date +%s) - START)))
    if [ "$left" -lt 10 ]; then
        printf '\n## %s\n\nskipped: the %s s budget is spent\n' "$name" "$BUDGET_S" >>"$REPORT"
        publish
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local log="$RESULTS/$STEM-$name.log" t0 rc cached
    t0=$(date +%s)
    cached=$(cache_entries)
    echo "== $name (time box ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
    rc=$?
    local took=$(($(date +%s) - t0)) status="ok" compiled=$(($(cache_entries) - cached))
    [ "$rc" -ne 0 ] && status="exit code $rc"
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && status="timed out after ${limit}s"
    {
        printf '\n## %s (%s, %ss, %s new Triton cache entries)\n\n`%s`\n\n```\n' "$name" "$status" "$took" \
            "$compiled" "$*"
        tail -n 60 "$log"
        printf '```\n'
    } >>"$REPORT"
    echo "   $status in ${took}s; log: $log"
    publish
}

want() { [[ " $SECTIONS " == *" $1 "* ]]; }

# Kernels in Triton's cache folder (one entry per compiled variant): a section after the warmup should add none.
cache_entries() { find "$TRITON_CACHE_DIR" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l; }

{
    printf '# sdvae-fast GPU check, %s\n\n' "$STEM"
    printf 'Sections: %s. Budget %s s. Full logs: %s-*.log.\n' "$SECTIONS" "$BUDGET_S" "$STEM"
} >"$REPORT"

if want env; then
    printf '\n## environment\n\n' >>"$REPORT"
    timeout 30 "$PY" -m sdvae_fast.bench env-info --md "$REPORT" --json "$RESULTS/$STEM-env.json" >/dev/null 2>&1 \
        || printf -- '- environment record failed\n' >>"$REPORT"
    publish
fi
# Every variant the sections below need, compiled in parallel (one process per core), then autotuning settled once.
want warmup && section warmup 100 "$PY" -m sdvae_fast.cli warmup --plan bench/gpu_plan.json -q
# Correctness, with names and numbers in the logs as they come (-v -s), so a section cut by its box keeps them.
BIG="batch_of_32 or 4096_decode"
want tests && section tests 60 "$PY" -m pytest -v -s -m gpu tests -k "not ($BIG)" -p no:cacheprovider --durations=10
want parity && section parity 30 "$PY" -m sdvae_fast.cli parity --preset sd15 --res 512 --dtype bf16 -q \
    --out "$RESULTS/$STEM-parity"
want big && section big 40 "$PY" -m pytest -v -s -m gpu tests/test_gpu.py -k "$BIG" -p no:cacheprovider
# Timing last.
want conv && section conv 30 "$PY" bench/bench_conv.py --out "$RESULTS/$STEM-conv"
want attention && section attention 25 "$PY" bench/bench_attention.py --out "$RESULTS/$STEM-attention" --n 4096 16384
want e2e && section e2e 90 "$PY" -m sdvae_fast.cli bench --res 512 1024 2048 --dtype bf16 --preset sd15 -q \
    --out "$RESULTS" --name "$STEM-e2e" --budget-s 1.0
want coldstart && section coldstart 150 "$PY" bench/cold_start.py --out "$RESULTS/$STEM-coldstart"
# The consistency decoder (optional): results are rewritten after every measurement, so a cut run keeps them.
want consistency && section consistency 480 "$PY" bench/bench_consistency.py --sizes 512 1024 --out "$RESULTS" \
    --name "$STEM-consistency"
# Issue 14 (optional): the VQ quantiser against cdist + argmin, then FLUX.2's VAE decode at 1024^2 (both rewrite
# their results after every measurement, so a cut run keeps them; flux2 times eager and ours of both models before
# any torch.compile).
want quantize && section quantize 120 "$PY" bench/bench_quantize.py --out "$RESULTS" --name "$STEM-quantize"
want flux2 && section flux2 420 "$PY" bench/bench_flux2.py --size 1024 --out "$RESULTS" --name "$STEM-flux2"
# Patch parallel (optional): the plain 1-GPU decode, then torchrun over every GPU (capped at 8); both rows go to
# DATE-GPU-pp.md and the log. The torchrun run's status wins unless it succeeds, then the baseline's.
if want pp; then
    NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
    [ "$NGPU" -gt 8 ] && NGPU=8
    [ "$NGPU" -lt 1 ] && NGPU=1
    section pp 240 bash -c '"$1" bench/pp_bench.py --size 4096 --dtype bf16 --out "$2"; rc=$?
        "$1" -m torch.distributed.run --standalone --nproc-per-node "$3" bench/pp_bench.py --size 4096 \
            --dtype bf16 --out "$2" && exit $rc' pp "$PY" "$RESULTS/$STEM-pp.md" "$NGPU"
fi

printf '\nTotal %ss.\n' "$(($(date +%s) - START))" >>"$REPORT"
publish
echo "report: $REPORT"
