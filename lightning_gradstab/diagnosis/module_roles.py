"""How the tracer records each module: as one node (a layer, a normalization, an activation, a scaling) or
by tracing inside it, decided once per module at its first call.

Known classes are decided by class. A leaf we do not know by class is decided by what it computes (see
:mod:`.behaviour`): with only per-feature parameters it is a normalization (output invariant to the input's
scale), a deliberate scaling (``scale * x + bias``: LayerScale, SkipInit gates, affine blocks) or else a layer
(once a module normalises, an equal one, by class, attributes and parameter shapes, is only measured for its gain;
one that takes several signal paths is a normalization of its first or else traced inside, where its add is a join);
with larger parameters it is traced inside (its weights are read where its forward applies them); without any,
a parameter-free elementwise leaf is classified as a sigmoid-, tanh- or ReLU-like activation on a grid (so
GELU-tanh's internal add and tanh are not read as structure), once per class and attributes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from lightning_gradstab.diagnosis.behaviour import (
    classify_elementwise,
    ignores_input,
    linear_part_gain,
    norm_gain,
    scaled_output_rms,
    scaling_behaviour,
)
from lightning_gradstab.diagnosis.ops import NORM_TYPES, activation_module_name, layer_kind
from lightning_gradstab.diagnosis.recording import Recording

Role = tuple[str, float]
"""``(what, slope or gain)``: ``what`` is ``"layer"``, ``"norm"``, ``"scale"``, ``"activation"`` (by class) or
``"activation:<name>"`` (by behaviour)."""


class ModuleRoles:
    """The role of every module the model calls, decided at its first call (see the module).

    The behavioural tests call the module on probe inputs: they run with ``recording.testing`` set and the
    function mode off, so nothing they do is recorded.
    """

    def __init__(self, model: nn.Module, recording: Recording) -> None:
        self.model = model
        self.recording = recording
        self.decided: dict[int, Role | None] = {}  # module id -> its role (None: traced inside)
        self._behaviours: dict[tuple, Role | None] = {}  # see behaviour_key
        self._normalizations: set[tuple] = set()  # keys of parameterised leaves found to normalise (see _leaf_role)
        self._scalings: set[tuple] = set()  # keys of parameterised leaves found to compute scale * x + bias

    def may_record(self, module: nn.Module) -> bool:
        """Whether ``module`` gets hooks: a known layer, normalization or activation class, or any other leaf
        but dropout and identity (decided at its first call)."""
        if layer_kind(module) or isinstance(module, NORM_TYPES) or activation_module_name(module):
            return True
        if isinstance(module, (nn.modules.dropout._DropoutNd, nn.Identity)) or module is self.model:
            return False  # the model itself is never one opaque layer: its forward is what we trace
        return next(module.children(), None) is None  # leaves: decided by what they compute at the first call

    def decide(self, module: nn.Module, args: tuple) -> Role | None:
        """How a module is recorded: ``("layer"|"norm"|"activation"|..., slope)``, None to trace its internals."""
        if id(module) in self.decided:
            return self.decided[id(module)]
        activation = activation_module_name(module)
        if layer_kind(module):
            role: Role | None = ("layer", 0.0)
        elif isinstance(module, NORM_TYPES):
            role = ("norm", 0.0)
        elif activation:
            role = ("activation", float(getattr(module, "negative_slope", 0.0)))
        else:
            self.recording.testing = True
            try:
                with torch._C.DisableTorchFunction():  # probing its behaviour is no part of the model's graph
                    role = self._leaf_role(module, args)
            finally:
                self.recording.testing = False
        self.decided[id(module)] = role
        return role

    def _leaf_role(self, module: nn.Module, args: tuple) -> Role | None:
        first = next((a for a in args if isinstance(a, Tensor)), None)
        if first is None:
            return None
        parameters = list(module.parameters(recurse=False))
        if parameters and all(p.dim() <= 1 for p in parameters):
            # a normalization (norm classes carry per-feature gains; parameter-free ones call F.*_norm), or a
            # LayerScale, ReZero gate, per-channel affine block: measured through; else a layer
            key = behaviour_key(module, first)
            if key is not None:
                key += tuple(tuple(p.shape) for p in parameters)
            if key in self._normalizations:
                # an equal module already normalised its input: every layer of a Transformer has its own RMSNorm
                # instance, and scale invariance is what the class computes. Its own gain is still measured (the
                # output RMS at 16x the input, as scaling_behaviour reads it), one call instead of two; a gain
                # that is not positive (a zero weight) is left to the full test
                gain = scaled_output_rms(module, args, 16.0)
                if gain is not None and 0.0 < gain < math.inf:
                    return ("norm", gain)
            if len(self.recording.signal_only(self.recording.traced_inputs(args))) >= 2:
                # it combines several signal paths: a normalization of the first (a gated RMSNorm, Mamba-2's) is
                # one node, but anything else is traced inside. The tests vary the first argument only, so a sum
                # of two paths (a residual add with per-feature gains, ZAYA's) reads as an affine map of one, and
                # the skip connection inside it would vanish from the graph; traced inside, the add is a join
                gain = norm_gain(module, args)
                if gain is None:
                    return None
                role: Role = ("norm", gain)
            else:
                if key in self._scalings:
                    # an equal module already computed scale * x + bias (every block of a ResMLP or a SkipInit
                    # stack has its own gates): only its gain is measured, two calls instead of three and no
                    # normalization or linearity test (a gain that cannot be read is left to the full test)
                    gain = linear_part_gain(module, args)
                    if gain is not None and 0.0 <= gain < math.inf:
                        return ("scale", gain)
                role = scaling_behaviour(module, args) or ("layer", 0.0)
            if key is not None and role[0] == "scale":
                self._scalings.add(key)
            elif key is not None and role[0] == "norm" and not ignores_input(module, args):
                # a constant output (a zero scale with a bias) passes the normalization test without being one:
                # equal modules with other parameter values are not read by it
                self._normalizations.add(key)
            return role
        if parameters:
            return None  # an unfamiliar layer class: its weights are read where its forward applies them
        torch_builtin = type(module).__module__.startswith("torch.nn.")  # pooling, padding, ...: traced inside
        if not torch_builtin and next(module.buffers(recurse=False), None) is None and len(args) == 1:
            key = behaviour_key(module, first)
            if key is not None and key in self._behaviours:
                behaviour = self._behaviours[key]
            else:
                behaviour = classify_elementwise(module, first)
                if key is not None:
                    self._behaviours[key] = behaviour
            if behaviour is not None:
                return (f"activation:{behaviour[0]}", behaviour[1])
        return None


def behaviour_key(module: nn.Module, like: Tensor) -> tuple | None:
    """What decides the behaviour of a parameter- and buffer-free leaf on the classification grid: its class,
    its plain attributes (``approximate="tanh"``, a function it applies) and the grid's dtype and device. Two
    instances with equal keys compute the same function there (every layer of a Transformer has its own GELU
    module), so one classification serves them all. None when an attribute cannot be compared (a tensor, a
    container): that module is classified on its own."""
    attributes = []
    for name, value in vars(module).items():
        if name.startswith("_") or name == "training":
            continue
        # collections.abc.Callable is a valid isinstance target at runtime; mypy sees only its special form
        if isinstance(value, Tensor) or not isinstance(value, (int, float, str, bool, type(None), Callable)):  # type: ignore[arg-type]
            return None
        if isinstance(value, nn.Module):
            return None
        attributes.append((name, value))
    try:
        key = (type(module), tuple(attributes), like.dtype, like.device.type)
        hash(key)
    except TypeError:
        return None
    return key
