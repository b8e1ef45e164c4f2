"""The probe's measurements during the forward: each layer, join and activation output remembered, its
statistics taken in a few batched reductions, and every number brought to the host in one transfer.

Per layer the output mean/std and the RMS of the gradient that reaches the layer's output (the backpropagated
delta); per ReLU the fraction of dead units, per sigmoid/tanh the fraction of saturated outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge

from lightning_gradstab.diagnosis import symmetry
from lightning_gradstab.diagnosis.graph import ModelGraph
from lightning_gradstab.diagnosis.nodes import Node
from lightning_gradstab.diagnosis.ops import activation_family
from lightning_gradstab.diagnosis.probe_results import ActivationProbe, LayerProbe, ProbeResult
from lightning_gradstab.diagnosis.tracer import GraphTracer

SATURATION_MARGIN = 0.01
"""A sigmoid output within 0.01 of 0 or 1 (|x| > 4.6), or a tanh output beyond 0.99 (|x| > 2.6), is saturated:
the derivative there is below 1% of its peak."""


class Measurements:
    """The tracer's hooks for :func:`run_probe`: what each layer, join and activation output is, kept until the
    statistics are taken in a few batched reductions, and one final transfer to the host.

    Per-op statistics cost little on the device but a fixed few microseconds of dispatch each on the host, which
    on small models is most of the probe; so the forward only remembers the output tensors and the gradient
    edges of the layers (``get_gradient_edge``: the gradient that reaches the output as it was when recorded),
    and :meth:`flush` reduces every pending output of one shape in one stacked call (the mean, the standard
    deviation the way ``torch.std`` takes it, in float64 around a float32 mean, the live ReLU units, the
    saturated fraction: the same values as per-tensor calls). An op that writes in place (``relu_``,
    ``x += y``, ``inplace=True``) could change an output before it is read, so the statistics are taken before
    each one that writes into the storage of a pending output (a write elsewhere, such as BatchNorm's running
    statistics, leaves them pending: flushing there would reduce one output per call). The backward asks
    ``autograd.grad`` for the gradients at those edges instead of running one Python hook per layer. Every number
    lands in ``_parts`` and :meth:`read_back` brings them to the host with a single ``tolist()``.
    """

    def __init__(self, model: nn.Module) -> None:
        self.layer_probes: list[LayerProbe] = []
        self.edges: list[tuple[int, Any]] = []  # (index into layer_probes, gradient edge of its output)
        self.activation_probes: list[tuple[ActivationProbe, str]] = []  # (probe, "dead"/"saturated")
        # pending outputs: (index of the probe, detached output, unit axis or family)
        self._pending_layers: list[tuple[int, Tensor]] = []
        self._pending_activations: list[tuple[int, Tensor, Any]] = []
        self._parts: list[Tensor] = []  # 1-D float32 tensors, concatenated at read-back
        self._size = 0
        self.layer_positions: dict[int, tuple[int, int]] = {}  # probe index -> positions of its mean and std
        self.activation_positions: dict[int, int] = {}
        self._layer_slots: dict[int, int] = {}  # node index of a layer -> its slot in layer_probes
        self._feeding_layers: dict[int, int] = {}  # activation slot -> slot of the layer feeding it
        # the storages the pending outputs live in: a write elsewhere (BatchNorm's running statistics, an in-place
        # op on another tensor) leaves them as they are, so only a write into one of them reads them first
        self._pending_storages: set[int] = set()
        self._storage_unknown = False  # a pending output without a readable storage: read before any write
        self.tracer = GraphTracer(model, self.on_layer_output, self.on_activation, self.before_write)

    def _remember_storage(self, tensor: Tensor) -> None:
        try:
            self._pending_storages.add(tensor.untyped_storage().data_ptr())
        except Exception:  # a tensor subclass without storage
            self._storage_unknown = True

    def before_write(self, targets: list[Any] | None) -> None:
        """Take the pending statistics before a call writes in place into the storage of a pending output
        (``targets``: the tensors it may write, None when any may be written)."""
        if not (self._pending_layers or self._pending_activations):
            return
        if targets is not None and not self._storage_unknown:
            try:
                storages = [t.untyped_storage().data_ptr() for t in targets if isinstance(t, Tensor)]
            except Exception:  # a target without storage: read first
                storages = None
            if storages is not None and self._pending_storages.isdisjoint(storages):
                return
        self.flush()

    def on_layer_output(self, node: Node, tensor: Tensor) -> None:
        """Remember a layer's (or a join's) output for its mean and std, and the edge its gradient will reach."""
        if not tensor.is_floating_point():
            return
        kind = "join" if node.kind == "join" else node.layer_kind or "other"
        slot = len(self.layer_probes)
        self.layer_probes.append(
            LayerProbe(f"join:{node.index}" if node.kind == "join" else node.name, kind, node.index)
        )
        self._layer_slots[node.index] = slot
        self._pending_layers.append((slot, tensor.detach()))
        self._remember_storage(tensor)
        if tensor.requires_grad:
            self.edges.append((slot, get_gradient_edge(tensor) if tensor.grad_fn is not None else tensor))

    def on_activation(self, node: Node, tensor: Tensor) -> None:
        """Remember a ReLU/ReLU6 output for its dead fraction, a sigmoid/tanh output for its saturated fraction."""
        family = activation_family(node.op)
        units = 1
        how: int | str  # the unit axis of a ReLU, the family of a saturating activation
        if node.op in ("relu", "relu6"):
            axis = _unit_axis(node, self.tracer.nodes)
            units = int(tensor.shape[axis]) if tensor.dim() >= 2 else 1
            how, kind = axis, "dead"
        elif family in ("tanh", "sigmoid") and node.op != "logsigmoid":
            how, kind = family, "saturated"
        else:
            return
        name = _activation_display_name(node, self.tracer.nodes)
        if kind == "dead":
            feeding = _feeding_layer(node, self.tracer.nodes)
            if feeding is not None and feeding in self._layer_slots:
                self._feeding_layers[len(self.activation_probes)] = self._layer_slots[feeding]
        self._pending_activations.append((len(self.activation_probes), tensor.detach(), how))
        self._remember_storage(tensor)
        self.activation_probes.append((ActivationProbe(name, node.op, hidden=False, units=units), kind))

    def flush(self) -> None:
        """Take the statistics of every pending output, one stacked reduction per shape (see the class)."""
        self._pending_storages.clear()
        self._storage_unknown = False
        with torch.no_grad():
            if self._pending_layers:
                pending, self._pending_layers = self._pending_layers, []
                for slots, stacked in _stacked(pending):
                    flat = (stacked if stacked.dtype == torch.float32 else stacked.float()).reshape(len(slots), -1)
                    mean = flat.mean(1)
                    if flat.shape[1] <= 1:
                        std = mean * 0
                    elif len(slots) == 1:
                        std = torch.std(flat[0]).reshape(1)
                    else:  # torch.std's two passes: float64 squares around the float32 mean, in one buffer
                        # float64, not float32: a float32 square underflows for a std below ~1e-19, which is
                        # what the outputs of a vanishing signal measure (a 1e-10 init gives 1e-26); measured:
                        # EfficientNet's broken default then names 5 more modules as vanishing, their std read as 0
                        deviations = flat.double()  # a copy: written in place (fresh pages cost more than the math)
                        deviations.sub_(mean[:, None]).square_()  # the float32 mean promoted exactly, in the call
                        std = deviations.sum(1).div_(flat.shape[1] - 1).sqrt_().float()
                    position = self._push(mean)
                    self._push(std)
                    for offset, slot in enumerate(slots):  # the std of each lies len(slots) after its mean
                        self.layer_positions[slot] = (position + offset, position + len(slots) + offset)
            if self._pending_activations:
                pending_activations, self._pending_activations = self._pending_activations, []
                keyed = [((slot, how), tensor) for slot, tensor, how in pending_activations]
                for slots, stacked in _stacked(keyed, key=lambda item: item[0][1]):
                    how = slots[0][1]
                    fresh = len(slots) > 1  # a stacked copy, not a view of the model's tensor
                    values = (
                        _alive_units(stacked, how, fresh) if isinstance(how, int) else _saturated_fraction(stacked, how)
                    )
                    position = self._push(values)  # counts or fractions, one per output (cat promotes them)
                    for offset, (slot, _) in enumerate(slots):
                        self.activation_positions[slot] = position + offset

    def _push(self, values: Tensor) -> int:
        position = self._size
        self._parts.append(values)
        self._size += values.numel()
        return position

    def read_back(
        self,
        result: ProbeResult,
        weight_grads: dict[str, Tensor],
        edge_grads: list[tuple[int, Tensor]],
        loss: Tensor | None,
        tied_grads: dict[str, Tensor] | None = None,
    ) -> None:
        """Bring every gathered statistic to the host in one transfer and fill ``result``'s probes and loss
        (``tied_grads``: gradients of layers whose weight rows are identical, read as their row statistics)."""
        self.flush()
        grad_positions: dict[int, int] = {}
        with torch.no_grad():
            for slots, stacked in _stacked(edge_grads):  # the RMS of the gradient at each layer output
                flat = (stacked if stacked.dtype == torch.float32 else stacked.float()).reshape(len(slots), -1)
                copied = len(slots) > 1 or stacked.dtype != torch.float32  # else a view of the gradient itself
                position = self._push((flat.square_() if copied else flat.square()).mean(1).sqrt_())
                grad_positions.update((slot, position + offset) for offset, slot in enumerate(slots))
        weight_position = self._size
        if weight_grads:
            self._push(torch.stack(list(weight_grads.values())))
        tied_position = self._size
        with torch.no_grad():
            for gradient in (tied_grads or {}).values():  # rare: only layers whose rows start identical
                self._push(symmetry.gradient_row_statistics(gradient))
        if loss is not None:
            self._push(loss.detach().float().reshape(1))
        numbers = _to_host(self._parts)
        for offset, name in enumerate(tied_grads or {}):
            at = tied_position + 2 * offset
            result.gradient_rows[name] = (numbers[at], numbers[at + 1])
        weight_values = dict(zip(weight_grads, numbers[weight_position:], strict=False))
        for slot, probe in enumerate(self.layer_probes):
            mean_at, std_at = self.layer_positions[slot]
            probe.output_mean, probe.output_std = numbers[mean_at], numbers[std_at]
            probe.grad_rms = numbers[grad_positions[slot]] if slot in grad_positions else None
            probe.weight_grad_norm = weight_values.get(probe.name)
            (result.joins if probe.kind == "join" else result.layers).append(probe)
        hidden = _hidden_activations(result.graph)
        for slot, (activation_probe, kind) in enumerate(self.activation_probes):
            value = numbers[self.activation_positions[slot]]
            # the dead fraction is gathered as the number of live units
            setattr(
                activation_probe,
                f"{kind}_fraction",
                1.0 - value / activation_probe.units if kind == "dead" else value,
            )
            activation_probe.hidden = activation_probe.name in hidden
            if slot in self._feeding_layers:
                feeding = self.layer_probes[self._feeding_layers[slot]]
                activation_probe.input_zero = feeding.output_mean == 0.0 and feeding.output_std == 0.0
            result.activations.append(activation_probe)
        if loss is not None:
            result.loss = numbers[-1]


STACKED_NUMEL = 1 << 15
"""Outputs of at most this many elements are reduced stacked with the others of their shape (the dispatch of
one call per tensor is most of the cost there); larger ones one by one, without a copy (the reduction itself
is the cost there, and a stacked float64 copy of large tensors only adds memory traffic)."""


def _stacked(
    items: list[tuple[Any, Tensor]],
    key: Callable[[tuple[Any, Tensor]], Any] | None = None,
    limit: int = 1 << 22,
) -> Iterator[tuple[list[Any], Tensor]]:
    """``(ids, stacked tensors)`` for the items grouped by shape, dtype, device (and ``key``), at most ``limit``
    elements per stack; a tensor of more than :data:`STACKED_NUMEL` elements comes alone, as a view."""
    groups: dict[Any, list[tuple[Any, Tensor]]] = {}
    for item in items:
        tensor = item[1]
        if tensor.numel() > STACKED_NUMEL:
            yield [item[0]], tensor.unsqueeze(0)
            continue
        group = (tensor.shape, tensor.dtype, tensor.device, key(item) if key is not None else None)
        groups.setdefault(group, []).append(item)
    for members in groups.values():
        if len(members) == 1:
            yield [members[0][0]], members[0][1].unsqueeze(0)
            continue
        per_stack = max(1, limit // max(members[0][1].numel(), 1))
        for start in range(0, len(members), per_stack):
            chunk = members[start : start + per_stack]
            yield [ident for ident, _ in chunk], torch.stack([tensor for _, tensor in chunk])


def _to_host(tensors: list[Tensor]) -> list[float]:
    """The probe's final host sync: concatenate the 1-D parts (float32, and counts, which ``cat`` promotes
    to it) on the first one's device and read them back at once."""
    if not tensors:
        return []
    try:
        return torch.cat(tensors).tolist()
    except RuntimeError:  # parts on several devices (a model split across GPUs)
        device = tensors[0].device
        return torch.cat([t.to(device) for t in tensors]).tolist()


def _unit_axis(node: Node, nodes: list[Node]) -> int:
    """Channels for conv feature maps (dim 1), features (last dim) otherwise."""
    cursor = node
    while cursor.inputs and cursor.kind != "layer":
        cursor = nodes[cursor.inputs[0]]
    return 1 if cursor.layer_kind == "conv" else -1


def _alive_units(outputs: Tensor, unit_axis: int, in_place: bool = False) -> Tensor:
    """For each of the stacked ReLU-family outputs (dim 0; never negative), the number of units with a positive
    output for some sample.

    A unit is alive when the maximum of its outputs is non-zero: one max-reduction over the other axes and a
    count, several times cheaper on CPU than a boolean ``(output > 0).any``; NaN is read as not positive first, as
    ``output > 0`` reads it (in place when ``outputs`` is a stacked copy). The dead fraction, 1 - alive / units,
    is taken on the host.
    """
    finite = torch.nan_to_num_(outputs, nan=0.0) if in_place else torch.nan_to_num(outputs, nan=0.0)
    if outputs.dim() < 3:  # outputs of fewer than 2 dimensions: one unit each
        return finite.reshape(len(outputs), -1).amax(1) != 0
    axis = unit_axis % (outputs.dim() - 1)
    return finite.amax(dim=tuple(d + 1 for d in range(outputs.dim() - 1) if d != axis)).count_nonzero(dim=1)


def _saturated_fraction(outputs: Tensor, family: str) -> Tensor:
    """For each of the stacked sigmoid/tanh outputs (dim 0), the fraction of values in the flat tails."""
    values = outputs.float().reshape(len(outputs), -1)
    if family == "sigmoid":
        return ((values < SATURATION_MARGIN) | (values > 1 - SATURATION_MARGIN)).float().mean(1)
    return (values.abs() > 1 - SATURATION_MARGIN).float().mean(1)


def _feeding_layer(node: Node, nodes: list[Node]) -> int | None:
    """The node index of the layer whose output reaches activation ``node`` through reshapes, dropout and
    normalizations only (a normalization of an all-zero input outputs its bias), None when another op is between."""
    cursor = nodes[node.inputs[0]] if node.inputs else None
    while cursor is not None and cursor.kind in ("pass", "norm") and cursor.inputs:
        cursor = nodes[cursor.inputs[0]]
    return cursor.index if cursor is not None and cursor.kind == "layer" else None


def _activation_display_name(node: Node, nodes: list[Node]) -> str:
    if not node.name.startswith("F."):  # an activation module: its own qualified name
        return node.name
    cursor = node
    while cursor.inputs and cursor.kind not in ("layer", "norm"):
        cursor = nodes[cursor.inputs[0]]
    return f"{cursor.name} (F.{node.op})" if cursor.kind in ("layer", "norm") else f"F.{node.op}"


def _hidden_activations(graph: ModelGraph) -> set[str]:
    consumers = graph.consumers()
    hidden = set()
    for node in graph.nodes:
        if node.kind != "activation":
            continue
        frontier, seen = [node.index], set()
        while frontier:
            index = frontier.pop()
            if index in seen:
                continue
            seen.add(index)
            if any(graph.nodes[c].kind == "layer" for c in consumers[index]):
                hidden.add(_activation_display_name(node, graph.nodes))
                break
            frontier.extend(consumers[index])
    return hidden
