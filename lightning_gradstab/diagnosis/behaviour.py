"""Behavioural classification of modules we do not know by class: what a module computes, not its name.

A normalization's output does not change when its input is scaled (RMSNorm classes, T5's layer norm), a
deliberate scaling computes ``scale * x + bias`` (LayerScale, ReZero/SkipInit gates, affine blocks), and a
parameter-free elementwise module is sigmoid-, tanh- or ReLU-like by its shape on a grid. The tracer asks these
once per module (or per equal module) at its first call.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

_GRID_HALF_WIDTH = 8.0
"""Elementwise modules are classified on the grid [-8, 8]: far enough into the tails that sigmoid/tanh-like
functions are within 1e-3 of their bounds and ReLU-like ones within 1e-3 of the identity or of zero."""


def classify_elementwise(module: nn.Module, like: Tensor) -> tuple[str, float] | None:
    """``(activation name, negative slope)`` of a parameter-free elementwise module, by what it computes.

    The module is evaluated on a grid over [-8, 8]: a bounded monotone map onto (0, 1) is sigmoid-like
    (``hardsigmoid`` if it reaches the bounds exactly), onto (-1, 1) tanh-like, one that is the identity for
    large inputs and ~0 (or a small slope) for negative ones ReLU-like (``relu`` if exactly zero there, else
    ``leaky_relu`` with its slope, ``elu`` if it tends to -1, ``gelu`` otherwise). None when the module is not
    elementwise or none of these (its internals are then traced as usual).

    Example::

        classify_elementwise(transformers.activations.NewGELUActivation(), x)  # ("gelu", 0.0)
    """
    grid = torch.linspace(-_GRID_HALF_WIDTH, _GRID_HALF_WIDTH, 1601, device=like.device)
    grid = grid.to(like.dtype) if like.is_floating_point() else grid
    try:
        with torch.no_grad():
            values = module(grid)
            flipped = module(grid.flip(0))
    except Exception:  # not callable on a 1-D tensor: not an elementwise activation
        return None
    if not isinstance(values, Tensor) or values.shape != grid.shape or not isinstance(flipped, Tensor):
        return None
    if flipped.shape != grid.shape:  # not elementwise
        return None
    # the tests below read the grid, the values and the flipped values as float64 on the host, in numpy: the
    # same IEEE float64 arithmetic and comparisons as torch's (``isclose`` written out as torch computes it), at
    # a fraction of the dispatch cost of some forty small torch calls
    x, y, f = torch.stack([grid.double(), values.double(), flipped.double()]).cpu().numpy()
    f = f[::-1]
    negative, positive = x < -4, x > 4
    tail, tail_x = y[negative], x[negative]
    with np.errstate(all="ignore"):  # inf - inf and NaN comparisons read as torch reads them, silently
        finite = bool(np.isfinite(y).all())
        symmetric_ok = bool(_isclose(f, y, 1e-5, 1e-4).all())
        identity = bool(_isclose(y, x, 1e-5, 1e-4).all())
        low, high = float(y[0]), float(y[-1])
        increasing = bool((y[1:] - y[:-1] >= -1e-6).all())
        lowest, highest = float(y.min()), float(y.max())
        positive_identity = bool(_isclose(y[positive], x[positive], 1e-3, 1e-3).all())
        tail_zero = bool((tail == 0).all())
        rise, run = float(tail[-1] - tail[0]), float(tail_x[-1] - tail_x[0])
    if not finite or not symmetric_ok or identity:
        return None
    if increasing and lowest >= -1e-6 and highest <= 1 + 1e-6 and low < 1e-3 and high > 1 - 1e-3:
        return ("hardsigmoid" if low == 0.0 and high == 1.0 else "sigmoid"), 0.0
    if increasing and lowest >= -1 - 1e-6 and highest <= 1 + 1e-6 and low < -1 + 1e-3 and high > 1 - 1e-3:
        return ("hardtanh" if low == -1.0 and high == 1.0 else "tanh"), 0.0
    if not positive_identity:
        return None
    if tail_zero:
        return "relu", 0.0
    slope = rise / run
    with np.errstate(all="ignore"):
        leaky = 0.0 < slope < 1.0 and bool(_isclose(tail, slope * tail_x, 1e-3, 1e-4).all())
    if leaky:
        return "leaky_relu", slope
    if abs(low + 1.0) < 1e-2:
        return "elu", 0.0
    if abs(low) < 1e-2:
        return "gelu", 0.0
    return None


def _isclose(values: np.ndarray, other: np.ndarray, rtol: float, atol: float) -> np.ndarray:
    """``torch.isclose(values, other, rtol, atol)`` on float64 arrays, computed the way torch computes it: equal,
    or a finite ``|values - other|`` within ``atol + |rtol * other|``."""
    error = np.abs(values - other)
    return (values == other) | (np.isfinite(error) & (error <= atol + np.abs(rtol * other)))


def normalizes(module: nn.Module, args: tuple) -> bool:
    """Whether ``module`` normalises its input (see :func:`norm_gain`).

    Example::

        normalizes(transformers.models.t5.modeling_t5.T5LayerNorm(64), (x,))  # True
    """
    return norm_gain(module, args) is not None


def norm_gain(module: nn.Module, args: tuple) -> float | None:
    """Whether ``module`` normalises its input: its output does not change when the input is scaled.

    Tested on the real input scaled by 4 and by 16 (large enough that a typical epsilon no longer matters), so
    any normalisation class is recognised by what it computes (RMSNorm variants, T5's layer norm, channels-first
    layer norms), not by its name. Returns the module's gain, the RMS of its output (a normalised input has RMS
    1), or None if it does not normalise.

    Example::

        norm_gain(transformers.models.gemma.modeling_gemma.GemmaRMSNorm(64), (x,))  # 1.0: (1 + weight), weight 0
    """
    behaviour = _scaled_outputs(module, args, (4.0, 16.0))
    return _normalized_gain(*behaviour) if behaviour is not None else None


def affine_gain(module: nn.Module, args: tuple) -> float | None:
    """The gain of a module that computes ``scale * x + bias`` on its input, None if it computes anything else.

    Such modules (LayerScale, ReZero/SkipInit gates, the per-channel affine blocks of ResMLP or of a frozen
    BatchNorm) are deliberate scalings, not layers: they mix no features, so they add no depth, and their factor
    is measured through. Recognised by behaviour on the real input scaled by 4 and by 16 (the inputs
    :func:`norm_gain` tests) and by 0: the output minus the output at zero is linear in the input (four times the
    input gives four times it) and keeps its shape. The gain is the RMS of that linear part over the RMS of the
    input (``gamma``'s RMS for LayerScale).

    Example::

        affine_gain(LayerScale(64, init_values=1e-5), (x,))  # 1e-5
    """
    behaviour = _scaled_outputs(module, args, (4.0, 16.0, 0.0))
    return _linear_gain(*behaviour) if behaviour is not None else None


def scaling_behaviour(module: nn.Module, args: tuple) -> tuple[str, float] | None:
    """``("norm", gain)`` when ``module`` normalises its input (:func:`norm_gain`), ``("scale", gain)`` when it
    computes ``scale * x + bias`` (:func:`affine_gain`), None otherwise.

    Both tests read the same outputs at 4x and 16x the input, so a module is called three times at most (twice
    when it normalises), not once per test per scale: these calls are most of what classifying an unfamiliar
    parameterised leaf costs.

    Example::

        scaling_behaviour(LayerScale(64, init_values=1e-5), (x,))  # ("scale", 1e-5)
    """
    scaled = _scaled_outputs(module, args, (4.0, 16.0))
    if scaled is None:
        return None
    gain = _normalized_gain(*scaled)
    if gain is not None:
        return ("norm", gain)
    at_zero = _scaled_outputs(module, args, (0.0,))
    first, small, large = scaled  # the input and its outputs at the two factors above
    gain = _linear_gain(first, small, large, at_zero[1]) if at_zero is not None else None
    return ("scale", gain) if gain is not None else None


def linear_part_gain(module: nn.Module, args: tuple) -> float | None:
    """The gain :func:`affine_gain` reads, from the outputs at 4x and at 0 times the input only, without its tests
    that the module normalises nothing and is affine: for a module whose equal (same class, attributes and
    parameter shapes) already passed them, so its class computes ``scale * x + bias``. Two calls of the module
    instead of three, and only the two RMS reductions of the gain (no normalization test, no linearity residual):
    the same value, bit for bit, as :func:`affine_gain`'s.
    None where :func:`_scaled_outputs` gives nothing, and for a zero scale with a non-zero bias (a constant
    output, which the full tests read as a normalization of gain ``RMS(bias)``: left to them).

    Example::

        linear_part_gain(LayerScale(64, init_values=1e-5), (x,))  # 1e-5
    """
    scaled = _scaled_outputs(module, args, (4.0, 0.0))
    if scaled is None:
        return None
    first, small, zero = scaled
    with torch.no_grad():  # the very operations of _linear_gain, so the very same float64 numbers
        first_rms, linear_rms, offset = torch.stack(
            [
                first.double().square().mean().sqrt(),
                (small - zero).double().square().mean().sqrt(),
                zero.double().abs().amax(),
            ]
        ).tolist()
    reference = 4.0 * first_rms
    if reference <= 0 or (linear_rms == 0.0 and offset != 0.0):
        return None
    return linear_rms / reference


def ignores_input(module: nn.Module, args: tuple) -> bool:
    """Whether ``module`` outputs the same tensor at 4x and at 0 times its first input: a constant, as an affine
    block with a zero scale and a bias computes. :func:`norm_gain` reads such an output as a normalization (it
    does not change with the input's scale); it says nothing about what an equal module with other parameter
    values computes.

    Example::

        ignores_input(nn.LayerNorm(16), (x,))  # False: a normalization's output follows its input's direction
        ignores_input(lambda x: torch.ones_like(x), (x,))  # True
    """
    outputs = _scaled_outputs(module, args, (4.0, 0.0))
    return outputs is not None and bool(torch.equal(outputs[1], outputs[2]))


def scaled_output_rms(module: nn.Module, args: tuple, factor: float) -> float | None:
    """The RMS of ``module``'s output at ``factor`` times its first input, in float32 as
    :func:`scaling_behaviour` reads a normalization's gain; None where :func:`_scaled_outputs` gives nothing.

    Example::

        scaled_output_rms(LlamaRMSNorm(64), (x,), 16.0)  # ~1.0: the RMS of its weight of ones
    """
    scaled = _scaled_outputs(module, args, (factor,))
    if scaled is None:
        return None
    with torch.no_grad():
        return float(scaled[1].float().square().mean().sqrt())


def _scaled_outputs(module: nn.Module, args: tuple, factors: tuple[float, ...]) -> tuple[Tensor, ...] | None:
    """``(input, module(factor * input, *rest) for each factor)`` on the first tensor argument, without grad;
    None when there is no floating-point input, the module raises, or an output is not a tensor of its shape."""
    first = next((a for a in args if isinstance(a, Tensor)), None)
    if first is None or not first.is_floating_point() or first.numel() < 2:
        return None
    rest = args[1:]
    try:
        with torch.no_grad():
            outputs = tuple(module(first * factor, *rest) for factor in factors)
    except Exception:
        return None
    if not all(isinstance(t, Tensor) and t.shape == first.shape for t in outputs):
        return None
    return (first, *outputs)


def _normalized_gain(first: Tensor, small: Tensor, large: Tensor) -> float | None:
    """The output RMS when the outputs at 4x and 16x the input agree (a normalization), else None. The float32
    norms and their threshold are read back at once (the same comparisons as on the tensors)."""
    with torch.no_grad():
        scale = small.float().norm()
        scale, difference, threshold, gain = torch.stack(
            [scale, (large.float() - small.float()).norm(), 1e-3 * scale, large.float().square().mean().sqrt()]
        ).tolist()
    return gain if scale > 0 and difference <= threshold else None


def _linear_gain(first: Tensor, small: Tensor, large: Tensor, zero: Tensor) -> float | None:
    """RMS of ``f(4x) - f(0)`` over RMS of ``4x`` when ``f(16x) - f(0)`` is four times it (affine), else None.
    The float64 norms are read back at once (a Python float is a float64: the same arithmetic)."""
    with torch.no_grad():
        linear, quadrupled = (small - zero).double(), (large - zero).double()
        size, residual, first_rms, linear_rms = torch.stack(
            [
                quadrupled.norm(),
                (quadrupled - 4.0 * linear).norm(),
                first.double().square().mean().sqrt(),
                linear.square().mean().sqrt(),
            ]
        ).tolist()
    if not math.isfinite(size) or residual > 1e-4 * size + 1e-30:
        return None
    reference = 4.0 * first_rms
    return linear_rms / reference if reference > 0 else None
