"""One comparison helper for every parity test: relative L2 error, worst index and max abs error.

`relative L2 error` is `||a - b|| / ||b||` with b the reference, computed in float64.
"""
import torch


def error_report(actual: torch.Tensor, expected: torch.Tensor) -> dict:
    """Return {'rel_l2', 'max_abs', 'worst_index', 'nonfinite'} of `actual` against the reference `expected`.

    Both tensors must have the same shape; any dtype, layout or device (compared in float64 on CPU).
    """
    if tuple(actual.shape) != tuple(expected.shape):
        raise AssertionError(f"shape mismatch: got {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    a = actual.detach().to("cpu", torch.float64)
    b = expected.detach().to("cpu", torch.float64)
    nonfinite = int((~torch.isfinite(a)).sum())
    diff = (a - b).abs()
    diff = torch.where(torch.isfinite(diff), diff, torch.full_like(diff, float("inf")))
    flat = int(diff.argmax()) if diff.numel() else 0
    worst = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), a.shape)) if a.dim() else ()
    denom = b.norm().item()
    rel = (a - b).norm().item() / denom if denom > 0 else (a - b).norm().item()
    return {"rel_l2": rel, "max_abs": diff.max().item() if diff.numel() else 0.0, "worst_index": worst,
            "nonfinite": nonfinite}


def assert_close(actual, expected, *, rel_l2: float, atol: float = 0.0, name: str = "output") -> dict:
    """Assert `actual` matches the reference `expected`: finite, and rel L2 <= rel_l2 (or max abs <= atol).

    Prints the worst index, the max abs error and the relative L2 error either way (shown by pytest on failure,
    and with -s). Returns the report dict.
    """
    r = error_report(actual, expected)
    msg = (f"{name}: rel_l2={r['rel_l2']:.3e} (tol {rel_l2:.1e}) max_abs={r['max_abs']:.3e} "
           f"(atol {atol:.1e}) worst_index={r['worst_index']} nonfinite={r['nonfinite']}")
    print(msg)
    assert r["nonfinite"] == 0, msg
    assert r["rel_l2"] <= rel_l2 or r["max_abs"] <= atol, msg
    return r
