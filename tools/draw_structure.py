"""Draw the package's structure: the import graph and who calls whom from `decode` down to the kernels.

    python tools/draw_structure.py OUT_DIR [--prefix NAME]

Writes `OUT_DIR/NAME_imports.{dot,png}` and `OUT_DIR/NAME_calls.{dot,png}` (PNG only where Graphviz's `dot` is
installed, e.g. `apt-get install graphviz`).

- Imports: static, read with `ast` from every module of `sdvae_fast` and `sdvae_fast.kernels`; module-level
  imports are solid edges, imports inside functions (deferred) dashed. An edge in both directions is a cycle,
  drawn red.
- Calls: measured, not read. A seeded narrow `AutoencoderKL` decodes and encodes on the kernels under Triton's
  interpreter (set here before anything is imported) with `sys.setprofile` on; every call whose caller and callee
  are functions of the package is an edge (frames of torch or Triton in between are skipped, so a launcher calls
  the `@triton.jit` kernel it launches). Only the edges on a path from `AutoencoderKL.encode/decode` to a kernel
  are drawn. Edge labels count calls.
"""
from __future__ import annotations

import argparse
import ast
import collections
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"sdvae_fast": ROOT / "sdvae_fast", "sdvae_fast.kernels": ROOT / "kernels"}


def _modules() -> dict[str, Path]:
    """Module name -> source file for every module of the package."""
    out = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            if parts[:1] == ["kernels"] and package == "sdvae_fast":
                continue
            out[".".join([package, *parts])] = path
    return out


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module a `from ... import` names (relative imports resolved against `module`)."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base[: len(base) - node.level + (1 if path.stem == "__init__" else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def import_edges() -> dict[tuple[str, str], bool]:
    """(importer, imported) -> True when the import is at module level (False: only inside functions)."""
    modules = _modules()
    edges: dict[tuple[str, str], bool] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, path, node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    key = (name, target)
                    edges[key] = edges.get(key, False) or id(node) in top
    return edges


def _short(module: str) -> str:
    return module.replace("sdvae_fast.kernels.", "kernels/").replace("sdvae_fast.", "")


def imports_dot(edges: dict[tuple[str, str], bool]) -> str:
    lines = ["digraph imports {", "  rankdir=LR; node [shape=box, fontname=Helvetica, fontsize=10];"]
    for (a, b), top in sorted(edges.items()):
        style = "solid" if top else "dashed"
        color = "red" if (b, a) in edges else "black"
        lines.append(f'  "{_short(a)}" -> "{_short(b)}" [style={style}, color={color}];')
    lines.append("}")
    return "\n".join(lines)


def call_edges() -> collections.Counter:
    """Caller -> callee counts between the package's functions during one decode and one encode (interpreter)."""
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, str(ROOT))
    import torch

    import sdvae_fast.kernels
    from sdvae_fast import AutoencoderKL

    package_dir = str(Path(sdvae_fast.__file__).parent)
    kernels_dir = str(Path(sdvae_fast.kernels.__file__).parent)

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(32, 64), norm_num_groups=8, layers_per_block=1, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2).eval().requires_grad_(False)
    vae.set_backend("triton")
    z = torch.randn(1, 4, 3, 2)
    x = torch.rand(1, 3, 6, 4) * 2 - 1
    roots = (package_dir, kernels_dir)
    counts: collections.Counter = collections.Counter()
    stack: list = []

    def label(frame) -> str | None:
        path = frame.f_code.co_filename
        if not path.startswith(roots):
            return None
        module = "kernels/" if path.startswith(kernels_dir) else ""
        qual = getattr(frame.f_code, "co_qualname", frame.f_code.co_name)
        if "<" in qual:  # comprehensions, lambdas, genexprs: attribute to the enclosing function
            return None
        stem = Path(path).parent.name if Path(path).stem == "__init__" else Path(path).stem
        return f"{module}{stem}.{qual}"

    def profiler(frame, event, arg):
        if event == "call":
            me = label(frame)
            caller = next((s for s in reversed(stack) if s is not None), None)
            if me is not None and caller is not None and caller != me:
                counts[(caller, me)] += 1
            stack.append(me)
        elif event == "return" and stack:
            stack.pop()

    with torch.no_grad():
        sys.setprofile(profiler)
        try:
            vae.decode(z)
            vae.encode(x)
        finally:
            sys.setprofile(None)
    return counts


def on_kernel_paths(counts: collections.Counter) -> collections.Counter:
    """The edges that lie on a call path from `AutoencoderKL.encode/decode` to a Triton kernel (`*_kernel`)."""
    succ, pred = collections.defaultdict(set), collections.defaultdict(set)
    for a, b in counts:
        succ[a].add(b)
        pred[b].add(a)

    def reach(starts, step):
        seen, todo = set(starts), list(starts)
        while todo:
            for nxt in step[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    nodes = set(succ) | set(pred)
    roots = {n for n in nodes if n.endswith(("AutoencoderKL.decode", "AutoencoderKL.encode"))}
    kernels = {n for n in nodes if n.endswith("_kernel")}
    keep = reach(roots, succ) & reach(kernels, pred)
    return collections.Counter({(a, b): n for (a, b), n in counts.items() if a in keep and b in keep})


def calls_dot(counts: collections.Counter) -> str:
    lines = ["digraph calls {", "  rankdir=TB; node [shape=box, fontname=Helvetica, fontsize=9];"]
    for (a, b), n in sorted(on_kernel_paths(counts).items()):
        lines.append(f'  "{a}" -> "{b}" [label="{n}", fontsize=8];')
    lines.append("}")
    return "\n".join(lines)


def _write(out: Path, stem: str, dot: str) -> None:
    (out / f"{stem}.dot").write_text(dot + "\n", encoding="utf-8")
    if shutil.which("dot"):
        subprocess.run(["dot", "-Tpng", "-Gdpi=110", "-o", str(out / f"{stem}.png"), str(out / f"{stem}.dot")],
                       check=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--prefix", default="after")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    _write(args.out, f"{args.prefix}_imports", imports_dot(import_edges()))
    _write(args.out, f"{args.prefix}_calls", calls_dot(call_edges()))
    print(f"wrote {args.out}/{args.prefix}_imports.* and {args.prefix}_calls.*")


if __name__ == "__main__":
    main()
