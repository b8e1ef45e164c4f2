"""Which tensors are weights, and which layer each one names.

A weight is a parameter or a slice or re-layout of one taken in ``forward`` (``W[i]``, ``W.T``, ``W.unbind(0)``):
the tracer follows it to the op that applies it, and every application is a layer named after the weight (a
module's ``weight`` names the module). After the forward: the module and weight tensor of every recorded layer,
and the parameters no recorded layer used (tracing gaps).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from lightning_gradstab.diagnosis.nodes import Node
from lightning_gradstab.diagnosis.ops import pytree_leaves


class WeightNames:
    """The weights of one model as the forward takes them apart, and the parameters it used (by identity)."""

    def __init__(self, parameters: list[tuple[str, nn.Parameter]]) -> None:
        self.parameter_names = {id(p): n for n, p in parameters}
        self.parameter_owner = {id(p): n.rsplit(".", 1)[0] if "." in n else n for n, p in parameters}
        self.used_parameters: set[int] = set()
        self.derived: dict[int, str] = {}  # tensors that are (a slice or a layout of) a weight -> the weight's name
        self._alive: list[Tensor] = []  # keeps the derived tensors alive so ids are never reused

    def weight_name(self, tensor: Tensor) -> str | None:
        """The name of the weight ``tensor`` is, or is a slice or re-layout of (``W[i].T``), else None."""
        if id(tensor) in self.derived:
            return self.derived[id(tensor)]
        cursor: Tensor | None = tensor
        while cursor is not None:
            if id(cursor) in self.parameter_names:
                return self.layer_name(self.parameter_names[id(cursor)])
            cursor = cursor._base
        return None

    def is_weight(self, tensor: Tensor) -> bool:
        return self.weight_name(tensor) is not None

    @staticmethod
    def layer_name(parameter: str) -> str:
        """A module's ``weight`` is the module (``blocks.0.fc``); any other parameter is itself (``w.3``,
        ``attn.W_q``), so two weights of one module applied in forward are two layers."""
        owner, _, attribute = parameter.rpartition(".")
        return owner if attribute == "weight" and owner else parameter

    def derive(self, op: str, args: tuple, weights: list[str], output: Any) -> None:
        """Remember the outputs of an op on weights alone as weights: ``W[i]``, ``W.T``, ``W.unbind(0)``."""
        name = weights[0]
        index = args[1] if len(args) > 1 and op in ("getitem", "select") else None
        if op == "select" and len(args) > 2:
            index = args[2]
        if isinstance(index, tuple) and index and isinstance(index[0], int):
            index = index[0]
        tensors = [t for t in pytree_leaves(output) if isinstance(t, Tensor)]
        for position, tensor in enumerate(tensors):
            suffix = (
                f"[{index}]"
                if isinstance(index, int)
                else (f"[{position}]" if op in ("unbind", "chunk", "split") else "")
            )
            self.derived[id(tensor)] = name + suffix
            self._alive.append(tensor)

    def release_tensors(self) -> None:
        """Forget the derived weights and let them go (once the graph is built)."""
        self.derived.clear()
        self._alive.clear()

    def untraced_parameters(self, model: nn.Module, recorded_modules: dict[str, nn.Module]) -> list[str]:
        """The parameters of ``model`` that no recorded module holds and no traced op read, by name."""
        # by identity: a parameter tied into a recorded module (a shared embedding / lm_head) is seen
        seen = set(self.used_parameters)
        recorded = set(recorded_modules)
        named = list(model.named_parameters(remove_duplicate=False))
        for name, parameter in named:
            owner = name.rsplit(".", 1)[0] if "." in name else ""
            while owner:  # a parameter of a recorded module or of one of its submodules
                if owner in recorded:
                    seen.add(id(parameter))
                    break
                owner = owner.rsplit(".", 1)[0] if "." in owner else ""
        return list(dict.fromkeys(name for name, parameter in named if id(parameter) not in seen))


def resolve_weights(
    nodes: list[Node], modules: list[tuple[str, nn.Module]], parameters: list[tuple[str, nn.Parameter]]
) -> dict[str, tuple[nn.Module | None, Tensor | None]]:
    """The module (None for a functional layer without one) and the weight tensor of every recorded layer."""
    resolved: dict[str, tuple[nn.Module | None, Tensor | None]] = {}
    by_name = dict(modules)
    parameter_by_name = dict(parameters)
    for node in nodes:
        if node.kind != "layer" or node.name in resolved:
            continue
        if node.weight is not None:  # a functional application: the very tensor it applied
            resolved[node.name] = (by_name.get(node.name), node.weight)
            continue
        module = by_name.get(node.name)
        weight = getattr(module, "weight", None) if module is not None else None
        if weight is None and module is not None:
            weight = next((p for n, p in module.named_parameters() if "weight_hh" in n or "in_proj" in n), None)
        if weight is None:
            weight = parameter_by_name.get(f"{node.name}.weight") or parameter_by_name.get(node.name)
        resolved[node.name] = (module, weight if isinstance(weight, Tensor) else None)
    return resolved
