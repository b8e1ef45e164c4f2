"""The forward hooks that record a module call as one node: layers, normalizations, activation modules,
scalings.

Every module that may be recorded whole gets a pre-hook and a post-hook. The pre-hook decides the module's role at
its first call (:mod:`.module_roles`) and, when it is recorded whole, enters it: nothing inside is recorded (the
nesting depth is shared with the function mode), and a torch module that writes no input in place runs with the
function mode off. The post-hook leaves it and records the call as one node, by a plan made at its first call.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn

from lightning_gradstab.diagnosis.module_roles import ModuleRoles
from lightning_gradstab.diagnosis.ops import NORM_TYPES, activation_module_name, layer_kind, pytree_leaves
from lightning_gradstab.diagnosis.recording import Recording

_UNDECIDED = object()

Plan = tuple[str, str, str, str | None, float]
"""``(name, node kind, op, layer kind, slope or gain)``: how every call of a recorded module becomes a node."""


class ModuleCalls:
    """The module hooks of one trace (see the module): installed by :meth:`install`, removed by :meth:`close`.

    ``recorded_modules``: every module recorded as one node, by name; :meth:`norm_gains` the gain of each
    normalization among them.
    """

    def __init__(self, model: nn.Module, modules: list[tuple[str, nn.Module]], recording: Recording) -> None:
        self.model = model
        self.modules = modules
        self.recording = recording
        self.roles = ModuleRoles(model, recording)
        self.module_names = {id(m): n for n, m in modules}
        self.recorded_modules: dict[str, nn.Module] = {}
        self._measured_gains: dict[str, float] = {}  # normalizations recognised by behaviour -> output RMS
        self._plans: dict[int, Plan] = {}  # module id -> see _plan
        # per active pre-hook: 0, or 1 when it suppressed the module's internals (2: with the function mode off)
        self._entered: list[int] = []
        self._disablers: list[Any] = []  # DisableTorchFunction contexts entered by pre-hooks, exited by post-hooks
        self._builtin: dict[type, bool] = {}
        self._handles: list[Any] = []

    def install(self) -> None:
        """Hook every module that may be recorded whole; a model that refuses Python hooks (TorchScript modules)
        becomes the recording's problem, with no hook left."""
        try:
            for _, module in self.modules:
                if self.roles.may_record(module):
                    self._handles.append(module.register_forward_pre_hook(self._pre_hook))
                    self._handles.append(module.register_forward_hook(self._post_hook))
        except Exception as error:  # e.g. TorchScript modules refuse Python hooks
            self.recording.problem = f"module hooks unavailable ({type(self.model).__name__}): {error}"
            self._remove_hooks()

    def close(self) -> None:
        """Remove the hooks and leave every module still entered (the forward raised inside it)."""
        self._remove_hooks()
        while self._disablers:  # a forward that raised inside a module: its post-hook never ran
            self._disablers.pop().__exit__(None, None, None)
        self._entered.clear()

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _pre_hook(self, module: nn.Module, args: Any) -> None:
        recording = self.recording
        if recording.testing:
            return
        if recording.depth == 0:
            entered = False
            if recording.problem is None:
                role = self.roles.decided.get(id(module), _UNDECIDED)
                if role is _UNDECIDED:
                    try:
                        role = self.roles.decide(module, args if isinstance(args, tuple) else (args,))
                    except Exception as error:
                        recording.problem = f"classifying module {type(module).__name__} failed: {error!r}"
                        role = None
                entered = role is not None
            if entered and self._opaque_builtin(module):
                # nothing inside is recorded, and torch's own module writes no input in place: its calls skip the
                # function mode (an inplace=True activation or a module of other code keeps it, for its writes)
                disabler = torch._C.DisableTorchFunction()
                disabler.__enter__()
                self._disablers.append(disabler)
                self._entered.append(2)
                recording.depth += 1
                return
        else:
            entered = True
        self._entered.append(1 if entered else 0)
        if entered:
            recording.depth += 1

    def _opaque_builtin(self, module: nn.Module) -> bool:
        """Whether a module recorded as one node is torch's own and does not write its input in place (decided
        once per class and flag)."""
        if getattr(module, "inplace", False) is True:
            return False
        cls = type(module)
        builtin = self._builtin.get(cls)
        if builtin is None:
            builtin = self._builtin[cls] = cls.__module__.startswith("torch.nn.")
        return builtin

    def _post_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        recording = self.recording
        if recording.testing:
            return
        entered = self._entered.pop() if self._entered else 0
        if not entered:
            return
        if entered == 2 and self._disablers:
            self._disablers.pop().__exit__(None, None, None)
        recording.depth -= 1
        if recording.depth != 0 or recording.problem is not None:
            return
        try:
            with torch._C.DisableTorchFunction():  # its own tensor reads (shapes) are not the model's ops
                self._record_module(module, args, output)
        except Exception as error:
            recording.problem = f"recording module {type(module).__name__} failed: {error!r}"

    def _plan(self, module: nn.Module) -> Plan:
        """How every call of a recorded module becomes a node, decided at its first call: ``(name, node kind, op,
        layer kind, slope or gain)``. The per-call work is then a lookup: a model's forward calls hundreds of
        modules, and each Python step per call adds to the probe's cost."""
        name = self.module_names.get(id(module), type(module).__name__)
        role, slope = self.roles.decided[id(module)] or ("layer", 0.0)
        self.recorded_modules[name] = module
        plan: Plan
        if role.startswith("activation"):
            op = role.split(":", 1)[1] if ":" in role else activation_module_name(module) or "relu"
            plan = (name, "activation", op, None, slope)
        elif role == "norm":
            plan = (name, "norm", type(module).__name__, None, slope)
            if not isinstance(module, NORM_TYPES):
                self._measured_gains.setdefault(name, slope)  # measured by behaviour at the first call
        elif role == "scale":
            plan = (name, "pass", "scale", None, slope)  # the gain measured at the first call
        else:
            plan = (name, "layer", type(module).__name__, layer_kind(module) or "other", slope)
        self._plans[id(module)] = plan
        return plan

    def _record_module(self, module: nn.Module, args: Any, output: Any) -> None:
        recording = self.recording
        name, kind, op, layer, slope = self._plans.get(id(module)) or self._plan(module)
        inputs = recording.traced_inputs(args)
        signal = recording.signal
        if kind == "layer":
            assert layer is not None  # _plan gives every "layer" plan a layer kind ("other" at least)
            node = recording.new_node("layer", name, op, inputs, signal=recording.layer_signal(layer, inputs))
            node.layer_kind = layer
            node.adds_depth = name not in recording.applied or layer != "recurrent"
            recording.applied.add(name)
        else:
            node = recording.new_node(kind, name, op, [i for i in inputs if signal[i]])
            if kind == "activation":
                node.negative_slope = slope
            elif kind == "pass":
                node.scale = slope
        first_input = (
            args[0]
            if args and isinstance(args[0], Tensor)
            else next((t for t in pytree_leaves(args) if isinstance(t, Tensor)), None)
        )
        node.input_shape = tuple(first_input.shape) if first_input is not None else ()
        recording.register_outputs(node, output, disabled=True)

    def norm_gains(self) -> dict[str, float]:
        """The gain of every recorded normalization: the RMS of a torch normalization's affine weight (1 without
        one), the output RMS measured at the first call for one recognised by behaviour."""
        weighted = {
            name: cast(Tensor, module.weight)  # a Tensor: the condition below checks it
            for name, module in self.recorded_modules.items()
            if isinstance(module, NORM_TYPES) and isinstance(getattr(module, "weight", None), Tensor)
        }
        gains = {name: 1.0 for name, m in self.recorded_modules.items() if isinstance(m, NORM_TYPES)}
        if weighted:
            rms = torch.stack([w.detach().float().square().mean().sqrt().cpu() for w in weighted.values()])
            gains.update(zip(weighted, rms.tolist(), strict=True))  # one host sync
        return {**gains, **self._measured_gains}
