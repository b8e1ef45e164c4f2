"""Probes on one real batch: forward + backward with hooks, and the model left exactly as it was found.

Per layer we measure the output mean/std and the norm of the gradient that reaches the layer's *output*
(the backpropagated delta). Weight-gradient norms alone stay roughly flat across depth even when the
signal vanishes (Glorot & Bengio 2010, Eq. 14; measured: ~1.4 first/last under both Xavier and He for a
30-layer ReLU MLP, while the delta ratio is 3e-5..1e-7 vs ~1), so the delta is what the signal rules read.

The backward uses ``torch.autograd.grad``: no ``.grad`` is touched and no optimizer sees anything. The
user's inputs are passed as they are (nothing is made to require grad: a model may set ``requires_grad`` on
what it derives from them, as Hugging Face speech encoders do); the backward is anchored at the outputs of the
first layers instead. Buffers (BatchNorm running statistics), per-module train/eval flags and the RNG state
are restored afterwards, so ``diagnose`` is invisible to the training that follows; the RNG is seeded for the
probe, so dropout draws the same masks wherever the probe runs (``diagnose``, ``InitAudit``). All statistics
stay on the device until one final transfer (a single host sync).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge
from torch.utils._pytree import tree_leaves

from lightning_gradstab.diagnosis.graph import ModelGraph
from lightning_gradstab.diagnosis.nodes import Node
from lightning_gradstab.diagnosis.ops import activation_family
from lightning_gradstab.diagnosis.tracer import GraphTracer

SATURATION_MARGIN = 0.01
"""A sigmoid output within 0.01 of 0 or 1 (|x| > 4.6), or a tanh output beyond 0.99 (|x| > 2.6), is saturated:
the derivative there is below 1% of its peak."""


@dataclass
class LayerProbe:
    """Measurements at one call of a parameterised layer.

    Attributes:
        name: module name.
        kind: layer kind (``linear``, ``conv``...).
        node: index of the call in the graph's node list (execution order).
        output_mean, output_std: statistics of the layer output on the batch.
        grad_rms: root-mean-square of the gradient reaching the output (None if the backward never got there).
        weight_grad_norm: norm of the gradient of the layer's weight (None if frozen or unused).
    """

    name: str
    kind: str
    node: int
    output_mean: float = 0.0
    output_std: float = 0.0
    grad_rms: float | None = None
    weight_grad_norm: float | None = None


@dataclass
class ActivationProbe:
    """Measurements at one activation: dead ReLU units or saturated sigmoid/tanh units.

    Attributes:
        name: the activation module name, or ``"<layer> (F.<op>)"`` for functional activations.
        op: activation name (``relu``, ``tanh``...).
        hidden: its output reaches another parameterised layer (it is not the model's output head).
        dead_fraction: fraction of units that output exactly zero for every sample (ReLU/ReLU6 only).
        saturated_fraction: fraction of outputs in the flat tails (sigmoid/tanh families only).
        units: number of units the dead fraction is taken over.
    """

    name: str
    op: str
    hidden: bool
    dead_fraction: float | None = None
    saturated_fraction: float | None = None
    units: int = 1


@dataclass
class ProbeResult:
    """Everything the rules read: the traced graph plus per-layer and per-activation measurements.

    Example::

        result = run_probe(model, lambda batch: model(batch), inputs=x)
        print(result.graph.plain_depth, [p.grad_rms for p in result.layers])
    """

    graph: ModelGraph
    layers: list[LayerProbe] = field(default_factory=list)
    activations: list[ActivationProbe] = field(default_factory=list)
    loss: float | None = None
    gradients_reached: bool = False
    joins: list[LayerProbe] = field(default_factory=list)
    """The same measurements at every skip connection's output (the residual stream), named ``join:<node>``."""
    factored_out: list[str] = field(default_factory=list)
    """Zero-initialised output layers whose effect was factored out: the random direction is applied to their
    input, since every gradient upstream of an all-zero head is exactly 0 at step 0 by construction."""


class ProbeError(ValueError):
    """The model could not be probed on the batch: its own forward (or backward) raised.

    A ``ValueError`` (the batch does not suit the model); the CLI exits with its "could not probe" status.
    """


def could_not_probe(report: Any) -> bool:
    """Whether ``report`` says the model ran but the probe could not measure it (a ``trace.incomplete`` finding
    whose evidence holds ``probe_failed``): the CLI's "could not probe" exit status.

    Example::

        if could_not_probe(diagnose(model, batch)):
            sys.exit(3)
    """
    return any(f.code == "trace.incomplete" and f.evidence.get("probe_failed") for f in report.findings)


@contextmanager
def preserved_state(
    model: nn.Module, modules: list[nn.Module] | None = None, devices: list[int] | None = None
) -> Iterator[None]:
    """Restore buffers, train/eval flags and the RNG state of ``model`` bit for bit on exit.

    Example::

        with preserved_state(model):
            model.train()
            model(x)  # BatchNorm running stats change here ...
        # ... and are back to their old values here
    """
    # ``modules``: ``model.modules()`` already listed, ``devices``: the CUDA devices of its parameters (the probe's
    # tracer walks the model once for everything)
    modules = list(model.modules()) if modules is None else modules
    if devices is None:
        devices = _cuda_devices(p for m in modules for p in m.parameters(recurse=False))
    modes = [(module, module.training) for module in modules]
    buffers = [buffer for module in modules for buffer in module.buffers(recurse=False)]
    saved = [buffer.detach().clone() for buffer in buffers]
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        with torch.no_grad():
            _copy_all(buffers, saved)
        for module, training in modes:
            if module.training != training:  # nn.Module.__setattr__ is slow: only the flags that changed
                module.training = training


def _copy_all(targets: list[Tensor], sources: list[Tensor]) -> None:
    """``target.copy_(source)`` for each pair, in one multi-tensor call where torch takes them together."""
    if len(targets) > 1:
        try:
            torch._foreach_copy_(targets, sources)
            return
        except (RuntimeError, TypeError):  # a tensor type the multi-tensor kernel does not take: one by one
            pass
    for target, source in zip(targets, sources, strict=True):
        target.copy_(source)


def _cuda_devices(parameters: Iterable[Tensor]) -> list[int]:
    """The indices of the CUDA devices the parameters live on (their generators are forked and seeded)."""
    return sorted({p.device.index for p in parameters if p.is_cuda} - {None})


@contextmanager
def eager_compiled(model: nn.Module, modules: list[nn.Module] | None = None) -> Iterator[None]:
    """Run every ``torch.compile``d submodule eagerly for the duration of the block.

    Module hooks added after compiling are not called inside the compiled graph, and tracing through it would
    recompile; so each ``OptimizedModule``'s compiled ``forward`` is swapped for its eager module's call and put
    back afterwards. Nothing is compiled, the compiled graphs stay as they were.

    Example::

        with eager_compiled(model):  # model.body = torch.compile(body)
            model(x)                  # body runs eagerly here
    """
    swapped = []
    for module in model.modules() if modules is None else modules:
        # an OptimizedModule's compiled forward is an instance attribute: asked first, so the eager module is
        # looked up (getattr raises and catches where it is missing) only on the few modules that have one
        if "forward" not in module.__dict__:
            continue
        original = getattr(module, "_orig_mod", None)
        if isinstance(original, nn.Module):
            swapped.append((module, module.__dict__["forward"]))
            module.__dict__["forward"] = original.__call__
    try:
        yield
    finally:
        for module, compiled in swapped:
            module.__dict__["forward"] = compiled


def run_probe(
    model: nn.Module,
    forward: Callable[[Any], Any],
    *,
    inputs: Any = None,
    loss_fn: Callable[[Any], Tensor] | None = None,
    seed: int = 0,
    direction_at_model_output: bool = False,
) -> ProbeResult:
    """Trace and probe ``model`` while ``forward(inputs)`` runs once, then backpropagate once.

    Args:
        model: the module whose layers are hooked.
        forward: runs the model on the batch it is given (``inputs``, passed unchanged) and returns its output.
        inputs: the batch tensors (registered as graph inputs; never modified, never made to require grad).
        loss_fn: maps the output to a scalar loss; None uses a random unit-variance direction on the output,
            so no labels are needed.
        seed: seeds that random direction and the RNG of the forward (dropout); the global RNG is restored.
        direction_at_model_output: apply the random direction to the output of the last parameterised module
            call ``forward`` makes at the top of ``model`` (``self.model(**batch)`` or ``self(batch)`` inside a
            ``training_step``) instead of to what ``forward`` returns: the callbacks then measure exactly what
            ``diagnose(model, batch)`` measures, whatever loss the training step computes after it.

    Raises:
        ProbeError: ``forward`` or the backward raised (the model cannot run on ``inputs``).

    Example::

        result = run_probe(model, lambda batch: model(batch), inputs=x)
        print([layer.grad_rms for layer in result.layers])
    """
    measurements = _Measurements(model)
    measurements.tracer.register_inputs(inputs)
    top_calls: list[Any] = []
    modules = [module for _, module in measurements.tracer.modules]  # the model walked once
    devices = _cuda_devices(p for _, p in measurements.tracer.parameters)
    with preserved_state(model, modules, devices), _top_level_outputs(model, top_calls, direction_at_model_output):
        _seed_rng(seed, devices)
        if not all(module.training for module in modules):
            model.train()  # a no-op when every module already trains (train() walks and sets every flag)
        try:
            with measurements.tracer.tracing(), eager_compiled(model, modules):
                output = forward(inputs)
        except Exception as error:
            raise ProbeError(f"the forward raised {type(error).__name__}: {error}") from error
        graph = measurements.tracer.build(output)
        loss = _loss(top_calls[-1] if top_calls else output, loss_fn if not top_calls else None, seed)
        result = ProbeResult(graph)
        loss = _factor_out_zero_heads(result, loss, seed)
        try:
            weight_grads, edge_grads = _backward(
                measurements.tracer.parameters, result, loss, inputs, measurements.edges
            )
        except RuntimeError as error:
            raise ProbeError(f"the backward raised {type(error).__name__}: {error}") from error
    measurements.read_back(result, weight_grads, edge_grads, loss)
    return result


def _seed_rng(seed: int, devices: list[int]) -> None:
    """Seed the CPU generator and those of the model's CUDA devices (``preserved_state`` restores them)."""
    torch.default_generator.manual_seed(seed)
    for index in devices:
        torch.cuda.default_generators[index].manual_seed(seed)


@contextmanager
def _top_level_outputs(model: nn.Module, outputs: list[Any], enabled: bool) -> Iterator[None]:
    """Collect, in ``outputs``, what each outermost call of ``model`` or of one of its parameterised children
    returns (the model call inside a training step; a parameter-free loss module is not one)."""
    if not enabled:
        yield
        return
    candidates = [model] + [child for child in model.children() if next(child.parameters(), None) is not None]
    depth = [0]
    handles = []

    def enter(module: nn.Module, args: Any) -> None:
        depth[0] += 1

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        depth[0] -= 1
        if depth[0] == 0 and any(isinstance(t, Tensor) and t.requires_grad for t in tree_leaves(output)):
            outputs.append(output)

    try:
        for module in candidates:
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave))
        yield
    finally:
        for handle in handles:
            handle.remove()


class _Measurements:
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
    ) -> None:
        """Bring every gathered statistic to the host in one transfer and fill ``result``'s probes and loss."""
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
        if loss is not None:
            self._push(loss.detach().float().reshape(1))
        numbers = _to_host(self._parts)
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
    """The single host sync of a probe: concatenate the 1-D parts (float32, and counts, which ``cat`` promotes
    to it) on the first one's device and read them back at once."""
    if not tensors:
        return []
    try:
        return torch.cat(tensors).tolist()
    except RuntimeError:  # parts on several devices (a model split across GPUs)
        device = tensors[0].device
        return torch.cat([t.to(device) for t in tensors]).tolist()


def _backward(
    parameters: Sequence[tuple[str, Tensor]],
    result: ProbeResult,
    loss: Tensor | None,
    inputs: Any,
    edges: list[tuple[int, Any]],
) -> tuple[dict[str, Tensor], list[tuple[int, Tensor]]]:
    """Backpropagate ``loss`` once with ``torch.autograd.grad`` (no ``.grad`` is written) and return the weight
    gradient norms of the requested layers, keyed by layer name, and the gradients reached at the layer outputs'
    ``edges`` (``(slot, gradient)``; an edge the backward never reaches is left out).

    A parameter whose gradient comes back None was never used by this forward (a mask token, a pooler left
    out), so it is dropped from ``graph.untraced``: it is not a tracing gap.
    """
    graph = result.graph
    weight_grads: dict[str, Tensor] = {}
    if loss is None:
        graph.problems.append("the output holds no floating-point tensor that requires grad: no backward")
        return weight_grads, []
    if not loss.requires_grad:
        return weight_grads, []
    targets = _anchors(graph, inputs)
    named = _gradient_parameters(parameters, graph, anchored=bool(targets))
    requested = targets + [edge for _, edge in edges] + [p for _, p in named]
    grads = torch.autograd.grad(loss, requested, allow_unused=True)
    at_edges = grads[len(targets) : len(targets) + len(edges)]
    edge_grads = [(slot, grad.detach()) for (slot, _), grad in zip(edges, at_edges, strict=True) if grad is not None]
    unused: set[str] = set()
    for (name, _), grad in zip(named, grads[len(targets) + len(edges) :], strict=True):
        if grad is None:
            unused.add(name)
        elif name.endswith("weight"):
            weight_grads[name.rsplit(".", 1)[0] if "." in name else name] = grad.detach().float().norm()
    graph.untraced = [name for name in graph.untraced if name not in unused]
    result.gradients_reached = True
    return weight_grads, edge_grads


def _loss(output: Any, loss_fn: Callable[[Any], Tensor] | None, seed: int) -> Tensor | None:
    if loss_fn is not None:
        loss = loss_fn(output)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(
                f"`loss_fn` must return a scalar tensor, got {type(loss).__name__}"
                f"{'' if not isinstance(loss, Tensor) else ' of shape ' + str(tuple(loss.shape))}"
            )
        return loss.reshape(())
    generator = torch.Generator().manual_seed(seed)
    terms = []
    for tensor in tree_leaves(output):
        if isinstance(tensor, Tensor) and tensor.is_floating_point() and tensor.requires_grad:
            direction = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
            if tensor.device != direction.device:
                direction = direction.to(tensor.device)
            terms.append(((tensor if tensor.dtype == torch.float32 else tensor.float()) * direction).sum())
    if len(terms) == 1:
        return terms[0]  # the same backward as a sum of one term
    return torch.stack(terms).sum() if terms else None


def _anchors(graph: ModelGraph, inputs: Any) -> list[Tensor]:
    """Tensors the backward must reach so that every layer's delta is computed without computing every weight
    gradient: the inputs that already require grad, and the outputs of the layers where the gradient starts
    (layers none of whose traced inputs requires grad: the first layers, embeddings). The inputs themselves are
    never made to require grad."""
    anchors = [t for t in tree_leaves(inputs) if isinstance(t, Tensor) and t.requires_grad]
    for node in graph.nodes:
        tensor = node.output
        if node.kind != "layer" or not isinstance(tensor, Tensor) or not tensor.requires_grad:
            continue
        upstream = [graph.nodes[i].output for i in node.inputs]
        starts = not any(isinstance(t, Tensor) and t.requires_grad for t in upstream)
        if starts and all(t is not tensor for t in anchors):
            anchors.append(tensor)
    return anchors


def _gradient_parameters(
    parameters: Sequence[tuple[str, Tensor]], graph: ModelGraph, anchored: bool
) -> list[tuple[str, Tensor]]:
    """The parameters whose gradients the rules read: the weights of the first and last layers (evidence that
    weight gradients stay flat while deltas vanish, Glorot & Bengio 2010) and parameters the tracer did not see
    (a None gradient means unused). Without an anchor every parameter is requested, which reaches every layer."""
    named = [(n, p) for n, p in parameters if p.requires_grad]
    if not anchored:
        return named
    layers = [layer.name for layer in graph.layers if layer.kind != "embedding" and layer.weight is not None]
    wanted = {f"{name}.weight" for name in layers[:1] + layers[-2:]} | set(graph.untraced)
    return [(n, p) for n, p in named if n in wanted]


def _factor_out_zero_heads(result: ProbeResult, loss: Tensor | None, seed: int) -> Tensor | None:
    """Add a random direction on the input of every all-zero output layer (torchvision ViT, timm MLP-Mixer
    heads): upstream of such a head the loss gradient is exactly zero, so the deltas would say nothing."""
    graph = result.graph
    heads = [
        layer
        for layer in graph.layers
        if layer.is_output and layer.weight is not None and layer.kind != "embedding" and layer.weight.dim() >= 2
    ]
    if not heads:
        return loss
    # all zero: no non-zero entry (NaN counts as non-zero, as it fails abs().amax() == 0)
    # cast: heads keeps only layers whose weight is not None
    zero = [
        not nonzero
        for nonzero in torch.stack([cast(Tensor, layer.weight).detach().any() for layer in heads]).tolist()
    ]
    generator = torch.Generator().manual_seed(seed + 1)
    terms = []
    for layer, is_zero in zip(heads, zero, strict=True):
        if not is_zero:
            continue
        node = next(n for n in graph.nodes if n.kind == "layer" and n.name == layer.name)
        for index in node.inputs:
            tensor = graph.nodes[index].output
            if isinstance(tensor, Tensor) and tensor.is_floating_point() and tensor.requires_grad:
                direction = torch.randn(tensor.shape, generator=generator, dtype=torch.float32).to(tensor.device)
                terms.append((tensor.float() * direction).sum())
        result.factored_out.append(layer.name)
    if not terms:
        return loss
    extra = torch.stack(terms).sum()
    return extra if loss is None else loss + extra


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
