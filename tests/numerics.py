"""Tolerances derived from the precision of the computation a test checks, not picked by hand.

A result computed in dtype `d` through a chain of roundings differs from an exact or differently ordered computation
by a few units of `torch.finfo(d).eps` per rounding, relative to the magnitude of the values involved. `assert_close`
bounds the largest absolute difference by `ulps * eps * scale`, where `scale` is the largest magnitude of the
expected values (at least 1), so one bound serves unit-norm embeddings and gradients of magnitude 40 alike, and a
float64 test fails when any step ran in float32.
"""

import torch


def tolerance(dtype: torch.dtype, scale: float = 1.0, ulps: float = 100) -> float:
    """The largest absolute difference allowed between two computations in `dtype` of values up to `scale`."""
    return ulps * torch.finfo(dtype).eps * max(float(scale), 1.0)


def _as_tensor(value) -> torch.Tensor:
    # A Python number is a double: as float64, not as torch's default float32, which would round it first
    return torch.as_tensor(value, dtype=torch.float64) if isinstance(value, (int, float)) else torch.as_tensor(value)


def assert_close(actual, expected, *, dtype: torch.dtype | None = None, ulps: float = 100, name: str = "") -> None:
    """Asserts `|actual - expected| <= tolerance(dtype, max|expected|, ulps)` elementwise; `dtype` defaults to the
    wider dtype of the two (the precision both were computed in; Python numbers count as float64), so pass it when a
    Python number holds a float32 result."""
    actual, expected = _as_tensor(actual), _as_tensor(expected)
    if dtype is None:
        dtype = torch.promote_types(actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    wide = torch.float64
    error = (actual.to(wide) - expected.to(wide)).abs().max().item() if actual.numel() else 0.0
    scale = expected.to(wide).abs().max().item() if expected.numel() else 0.0
    bound = tolerance(dtype, scale, ulps)
    assert error <= bound, (f"{name}: max abs difference {error:.3g} exceeds {bound:.3g} = {ulps} x eps({dtype}) x "
                            f"max(1, max|expected| = {scale:.3g})")
