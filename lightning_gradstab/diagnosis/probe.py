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
stay on the device until one final transfer; the weights' moments are read once before the backward (the layers
whose units start identical have their gradient asked too, :mod:`.symmetry`): two host syncs per probe.

This module runs the probe and its backward; the statistics are taken in :mod:`.measurements`, the model's state
is kept in :mod:`.model_state`, and what a probe returns is :mod:`.probe_results`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from lightning_gradstab.compiled import eager_compiled
from lightning_gradstab.diagnosis import symmetry
from lightning_gradstab.diagnosis.graph import ModelGraph
from lightning_gradstab.diagnosis.init_rules import layer_weight_moments
from lightning_gradstab.diagnosis.measurements import Measurements
from lightning_gradstab.diagnosis.model_state import cuda_devices, preserved_state, seed_rng
from lightning_gradstab.diagnosis.probe_results import ProbeError, ProbeResult


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
    measurements = Measurements(model)
    measurements.tracer.register_inputs(inputs)
    top_calls: list[Any] = []
    modules = [module for _, module in measurements.tracer.modules]  # the model walked once
    devices = cuda_devices(p for _, p in measurements.tracer.parameters)
    with preserved_state(model, modules, devices), _top_level_outputs(model, top_calls, direction_at_model_output):
        seed_rng(seed, devices)
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
        # the weights' moments before the backward: the layers whose units start identical have their gradient
        # asked too, to tell a tie that lasts from one the first step breaks (see .symmetry)
        result.weight_moments = layer_weight_moments(graph)
        spreads = {name: spread for name, (_, spread) in result.weight_moments.items()}
        tied, result.vector_weights = symmetry.candidates(graph, spreads, dict(measurements.tracer.parameters))
        try:
            weight_grads, edge_grads, tied_grads = _backward(
                measurements.tracer.parameters, result, loss, inputs, measurements.edges, tied
            )
        except RuntimeError as error:
            raise ProbeError(f"the backward raised {type(error).__name__}: {error}") from error
    measurements.read_back(result, weight_grads, edge_grads, loss, tied_grads)
    return result


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


def _backward(
    parameters: Sequence[tuple[str, Tensor]],
    result: ProbeResult,
    loss: Tensor | None,
    inputs: Any,
    edges: list[tuple[int, Any]],
    tied: Sequence[tuple[str, Tensor]] = (),
) -> tuple[dict[str, Tensor], list[tuple[int, Tensor]], dict[str, Tensor]]:
    """Backpropagate ``loss`` once with ``torch.autograd.grad`` (no ``.grad`` is written) and return the weight
    gradient norms of the requested layers, keyed by layer name, the gradients reached at the layer outputs'
    ``edges`` (``(slot, gradient)``; an edge the backward never reaches is left out), and the gradients of the
    ``tied`` weights (layers whose rows are identical, :func:`.symmetry.candidates`) by layer name.

    A parameter whose gradient comes back None was never used by this forward (a mask token, a pooler left
    out), so it is dropped from ``graph.untraced``: it is not a tracing gap.
    """
    graph = result.graph
    weight_grads: dict[str, Tensor] = {}
    if loss is None:
        graph.problems.append("the output holds no floating-point tensor that requires grad: no backward")
        return weight_grads, [], {}
    if not loss.requires_grad:
        return weight_grads, [], {}
    targets = _anchors(graph, inputs)
    named = _gradient_parameters(parameters, graph, anchored=bool(targets))
    requested = targets + [edge for _, edge in edges] + [p for _, p in named] + [w for _, w in tied]
    grads = torch.autograd.grad(loss, requested, allow_unused=True)
    at_edges = grads[len(targets) : len(targets) + len(edges)]
    edge_grads = [(slot, grad.detach()) for (slot, _), grad in zip(edges, at_edges, strict=True) if grad is not None]
    start = len(targets) + len(edges)
    unused: set[str] = set()
    for (name, _), grad in zip(named, grads[start : start + len(named)], strict=True):
        if grad is None:
            unused.add(name)
        elif name.endswith("weight"):
            weight_grads[name.rsplit(".", 1)[0] if "." in name else name] = grad.detach().float().norm()
    graph.untraced = [name for name in graph.untraced if name not in unused]
    tied_grads = {
        name: grad for (name, _), grad in zip(tied, grads[start + len(named) :], strict=True) if grad is not None
    }
    result.gradients_reached = True
    return weight_grads, edge_grads, tied_grads


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
