"""Run diffusers' own AutoencoderKL test file against diffusers' class and against ours, and compare the outcomes.

diffusers' tests are not in its wheel, so this needs a copy of diffusers' repository (a checkout or `git archive`
of the tag nearest to the installed version, e.g. v0.40.0-release for the pinned 0.42.1, whose test file has the
same 55 tests), plus the packages its test helpers import (`pip install accelerate parameterized`; keep them out of
the project's own environment if you like: a `python -m venv --system-site-packages` one works). Nothing of
diffusers' test code is copied here: the file is run in place, and for the "ours" run a pytest plugin (this
module, loaded with `-p`) swaps the `AutoencoderKL` name in the collected test modules for `sdvae_fast.AutoencoderKL`.

    python tools/diffusers_suite.py /path/to/diffusers-repo                 # both runs, table of outcomes
    python tools/diffusers_suite.py /path/to/diffusers-repo --backend triton -k "test_output or determinism"

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

TEST_FILE = "tests/models/autoencoders/test_models_autoencoder_kl.py"


# -- the pytest plugin (imported by the "ours" run through `-p tools.diffusers_suite`) ----------------------------


def pytest_collection_modifyitems(session, config, items):
    """Point every collected test module's `AutoencoderKL` at `sdvae_fast.AutoencoderKL`."""
    import sdvae_fast

    for item in items:
        module = getattr(item, "module", None)
        if module is not None and hasattr(module, "AutoencoderKL"):
            module.AutoencoderKL = sdvae_fast.AutoencoderKL


# -- the runner -----------------------------------------------------------------------------------------------------


def _run(repo: Path, ours: bool, backend: str, extra: list[str], python: str) -> dict[str, tuple[str, str]]:
    """{test id: (outcome, first line of the message)} of one pytest run of TEST_FILE in `repo`."""
    env = dict(os.environ)
    if ours:
        env["SDVAE_FAST_BACKEND"] = backend
        if backend == "triton":
            env["TRITON_INTERPRET"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                          env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        cmd = [python, "-m", "pytest", "-q", TEST_FILE, "-p", "no:cacheprovider", f"--junitxml={report}", *extra]
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
    parser.add_argument("repo", type=Path, help="a copy of diffusers' repository (holding tests/)")
    parser.add_argument("--backend", default="torch", choices=("torch", "triton", "auto"),
                        help="SDVAE_FAST_BACKEND for the run with our class (default: torch)")
    parser.add_argument("--python", default=sys.executable, help="the interpreter to run pytest with")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression (both runs)")
    args = parser.parse_args(argv)
    if not (args.repo / TEST_FILE).is_file():
        parser.error(f"repo: {args.repo / TEST_FILE} does not exist; pass a copy of diffusers' repository")
    extra = ["-k", args.keyword] if args.keyword else []
    theirs = _run(args.repo, False, args.backend, extra, args.python)
    ours = _run(args.repo, True, args.backend, extra, args.python)
    print(f"diffusers.AutoencoderKL:  {_counts(theirs)}")
    print(f"sdvae_fast.AutoencoderKL ({args.backend} backend):  {_counts(ours)}")
    regressions = 0
    for name in sorted(set(theirs) | set(ours)):
        a, b = theirs.get(name, ("absent", "")), ours.get(name, ("absent", ""))
        if a[0] != b[0]:
            regressions += a[0] == "passed"
            print(f"  {name}: diffusers {a[0]}, ours {b[0]}  {b[1] or a[1]}")
    return 1 if regressions else 0


if __name__ == "__main__":
    sys.exit(main())
