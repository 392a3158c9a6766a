"""Run diffusers' own test file of a VAE class against diffusers' class and against ours; compare the outcomes.

diffusers' tests are not in its wheel, so this needs a copy of diffusers' `tests/` folder (`git archive` of the
tag nearest to the installed version, e.g. `git archive v0.40.0-release tests` for the pinned 0.42.1, whose
AutoencoderKL test file has the same 55 tests). Copy `tests/` without `src/`: diffusers' `tests/conftest.py`
puts the repository's `src/` first on `sys.path`, so with it present the runs test that source instead of the
installed diffusers. Also needed: the packages its test helpers import (`pip install accelerate parameterized`;
keep them out of the project's own environment if you like: a `python -m venv --system-site-packages` one
works; pass its interpreter as `--python`). Nothing of
diffusers' test code is copied here: the file is run in place, and for the "ours" run a pytest plugin (this
module, loaded with `-p`) swaps the class name in the collected test modules for sdvae_fast's class of that name.
`--model` picks the class (`MODELS`): "kl" (default), AutoencoderKL and
`tests/models/autoencoders/test_models_autoencoder_kl.py`; "consistency", ConsistencyDecoderVAE (DALL-E 3's
consistency decoder) and `tests/models/autoencoders/test_models_consistency_decoder_vae.py`; "vq", VQModel
(latent diffusion's VQ autoencoders) and `tests/models/autoencoders/test_models_vq.py`.

    python tools/diffusers_suite.py /path/to/diffusers-copy                 # both runs, table of outcomes
    python tools/diffusers_suite.py /path/to/diffusers-copy --model consistency
    python tools/diffusers_suite.py /path/to/diffusers-copy --model vq --backend triton
    python tools/diffusers_suite.py /path/to/diffusers-copy --backend triton -k "test_output or determinism"

`--backend` sets `SDVAE_FAST_BACKEND` for the "ours" run ("triton" also sets TRITON_INTERPRET=1: the kernels under
Triton's interpreter on CPU). Prints the counts of each run and every test whose outcome differs, with the first
line of its failure; exits 1 when a test that passes for diffusers' class does not pass for ours.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

#: --model: (diffusers' test file, the class name swapped for sdvae_fast's class of that name).
MODELS = {
    "kl": ("tests/models/autoencoders/test_models_autoencoder_kl.py", "AutoencoderKL"),
    "consistency": ("tests/models/autoencoders/test_models_consistency_decoder_vae.py", "ConsistencyDecoderVAE"),
    "vq": ("tests/models/autoencoders/test_models_vq.py", "VQModel"),
}
#: The environment variable that tells the plugin which class name to swap (set by `_run`).
CLASS_ENV = "SDVAE_FAST_SUITE_CLASS"


# -- the pytest plugin (imported by the "ours" run through `-p tools.diffusers_suite`) ----------------------------


def pytest_collection_modifyitems(session, config, items):
    """Point the class name $SDVAE_FAST_SUITE_CLASS (default AutoencoderKL) of every collected test module at
    sdvae_fast's class of that name."""
    import sdvae_fast

    name = os.environ.get(CLASS_ENV, "AutoencoderKL")
    for item in items:
        module = getattr(item, "module", None)
        if module is not None and hasattr(module, name):
            setattr(module, name, getattr(sdvae_fast, name))


# -- the runner -----------------------------------------------------------------------------------------------------


def _run(repo: Path, model: str, ours: bool, backend: str, extra: list[str],
         python: str) -> dict[str, tuple[str, str]]:
    """{test id: (outcome, first line of the message)} of one pytest run of `model`'s test file in `repo`."""
    test_file, class_name = MODELS[model]
    env = dict(os.environ)
    if ours:
        env[CLASS_ENV] = class_name
        env["SDVAE_FAST_BACKEND"] = backend
        if backend == "triton":
            env["TRITON_INTERPRET"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                          env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        cmd = [python, "-m", "pytest", "-q", test_file, "-p", "no:cacheprovider", f"--junitxml={report}", *extra]
        if ours:
            cmd += ["-p", "tools.diffusers_suite"]
        subprocess.run(cmd, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not report.exists():
            raise SystemExit(f"pytest wrote no report for {' '.join(cmd)} (run it by hand to see why)")
        results = {}
        for case in ET.parse(report).getroot().iter("testcase"):
            name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
            outcome, message = "passed", ""
            for tag in ("failure", "error", "skipped"):
                node = case.find(tag)
                if node is not None:
                    outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                    message = (node.get("message") or "").strip().splitlines()[0:1]
                    message = message[0][:160] if message else ""
                    break
            results[name] = (outcome, message)
        return results


def _counts(results: dict) -> str:
    outcomes = [o for o, _ in results.values()]
    return ", ".join(f"{outcomes.count(k)} {k}" for k in ("passed", "failed", "error", "skipped") if k in outcomes)


def main(argv=None) -> int:
    """Command line entry point; returns the exit status (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repo", type=Path, help="a folder holding a copy of diffusers' tests/ (see above)")
    parser.add_argument("--model", default="kl", choices=sorted(MODELS),
                        help="kl: AutoencoderKL's test file (default); consistency: ConsistencyDecoderVAE's; "
                             "vq: VQModel's")
    parser.add_argument("--backend", default="torch", choices=("torch", "triton", "auto"),
                        help="SDVAE_FAST_BACKEND for the run with our class (default: torch)")
    parser.add_argument("--python", default=sys.executable, help="the interpreter to run pytest with")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression (both runs)")
    args = parser.parse_args(argv)
    test_file, class_name = MODELS[args.model]
    if not (args.repo / test_file).is_file():
        parser.error(f"repo: {args.repo / test_file} does not exist; pass a copy of diffusers' repository")
    extra = ["-k", args.keyword] if args.keyword else []
    theirs = _run(args.repo, args.model, False, args.backend, extra, args.python)
    ours = _run(args.repo, args.model, True, args.backend, extra, args.python)
    print(f"diffusers.{class_name}:  {_counts(theirs)}")
    print(f"sdvae_fast.{class_name} ({args.backend} backend):  {_counts(ours)}")
    regressions = 0
    for name in sorted(set(theirs) | set(ours)):
        a, b = theirs.get(name, ("absent", "")), ours.get(name, ("absent", ""))
        if a[0] != b[0]:
            regressions += a[0] == "passed"
            print(f"  {name}: diffusers {a[0]}, ours {b[0]}  {b[1] or a[1]}")
    return 1 if regressions else 0


if __name__ == "__main__":
    sys.exit(main())
