"""QK-clip: keep each attention head's logits below a cap by shrinking that head's query and key projections.

Attention logit growth (Dehghani et al. 2023; Wortsman et al. 2023, "Small-scale proxies for large-scale
Transformer training instabilities") is a property of the weights: the logits ``q . k / sqrt(d)`` are bilinear
in the query and key projections, so when their product grows the softmax turns one-hot, its gradient
``p (1 - p)`` vanishes and the loss stalls or diverges. The architectural fix is qk-layernorm. QK-clip (Kimi Team
2025, "Kimi K2: Open Agentic Intelligence", arXiv 2507.20534; J. Su, "QK-Clip", 2025) is the fix that needs no
change of architecture: after a step whose largest logit ``S_h`` of head ``h`` exceeds the cap ``tau``, the head's
query and key rows are multiplied by ``sqrt(gamma_h)`` each, ``gamma_h = tau / S_h``, so its logits shrink by
exactly ``gamma_h`` (biases included) and the largest is back at ``tau``. The values, the other heads and the
optimizer's state are untouched. Under grouped-query attention a key head is shared by several query heads, so
the whole factor goes on the query rows and the keys are left alone.

``tau = 100`` is Kimi K2's: far above any attention pattern's needs (a logit gap of 100 makes one key take all but
``e**-100`` of the weight against ``e**40`` others), so a healthy head never reaches it and the clip changes nothing
there. A head is measured on a sample (the watch's rows and query positions, every key), so a head's true maximum
can be a little higher than what is capped; growth is a trend over many steps, so the next measurement catches it.

Not capped (said in :attr:`AttentionLogitCap.skipped`): layers with a qk-norm (the logits are bounded by its gains;
rescaling the projections changes nothing), and projections whose parameters are not the full, local tensor the
head layout describes (a DTensor shard under FSDP2 or tensor parallelism, a flattened FSDP1 view), where the rows of
a head are not all on this rank.

Example::

    attention = nn.MultiheadAttention(16, 4, batch_first=True)
    cap = AttentionLogitCap(attention)        # finds the attention layers without a qk-norm
    cap.arm()                                 # measure the next training forward
    x = torch.randn(2, 8, 16)
    attention(x, x, x)
    logits = cap.take()                       # [4]: each head's largest logit, on the device
    capped = cap.apply(logits.tolist())       # rescales the heads above the cap: {} here
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_gradstab.arguments import check_positive
from lightning_gradstab.logits.sites import AttentionSite, find_attention_sites, fused_width
from lightning_gradstab.logits.watch import LogitWatch

DEFAULT_CAP = 100.0
"""Kimi K2's ``tau``: the largest attention logit QK-clip lets a head keep."""


_Slice = tuple[Tensor, int, int, int]  # (parameter, dimension, first index, count)


@dataclass(frozen=True)
class _HeadRows:
    """Where one head's query and key rows live: ``(parameter, dimension, first index, count)`` per parameter
    (the output dimension: 0 for a Linear's weight and every bias, 1 for a GPT-2 ``Conv1D``'s weight)."""

    query: tuple[_Slice, ...]
    key: tuple[_Slice, ...]


def _rows(parameters: Sequence[tuple[Tensor | None, int]], start: int, count: int) -> tuple[_Slice, ...]:
    return tuple((p, dim, start, count) for p, dim in parameters if p is not None)


def _is_local_tensor(parameter: Tensor | None) -> bool:
    return parameter is None or type(parameter) in (nn.Parameter, Tensor)


def _layout(site: AttentionSite) -> tuple[list[_HeadRows] | None, str]:
    """Each head's rows in the site's parameters, or ``None`` and why the site cannot be capped."""
    heads, kv_heads = site.num_heads, site.num_kv_heads
    if site.kind == "separate":
        query, key = site.query, site.key
        assert isinstance(query, nn.Linear) and isinstance(key, nn.Linear)  # _site builds separate sites so
        parameters: tuple[Tensor | None, ...] = (query.weight, query.bias, key.weight, key.bias)
        d_q, d_k = query.out_features // heads, key.out_features // kv_heads
        shapes_fit = query.weight.shape[0] == query.out_features and key.weight.shape[0] == key.out_features
        q_side: tuple[tuple[Tensor | None, int], ...] = ((query.weight, 0), (query.bias, 0))
        k_side: tuple[tuple[Tensor | None, int], ...] = ((key.weight, 0), (key.bias, 0))
        q_start = [h * d_q for h in range(heads)]
        k_start = [h * d_k for h in range(heads)] if kv_heads == heads else None  # shared keys: queries only
    else:
        out_dim = 0
        if site.kind == "fused":
            fused = site.query
            width = fused_width(fused)
            assert fused is not None and width is not None  # _site builds fused sites so
            weight, bias, embed = fused.weight, fused.bias, width // 3
            out_dim = 0 if isinstance(fused, nn.Linear) else 1  # a Conv1D's weight is [in, out]
            if not isinstance(weight, Tensor) or not isinstance(bias, (Tensor, type(None))):
                return None, "its fused projection has no weight tensor"
        else:
            attention = site.module
            assert isinstance(attention, nn.MultiheadAttention)  # the "mha" kind
            weight, bias, embed = attention.in_proj_weight, attention.in_proj_bias, attention.embed_dim
            if weight is None:
                return None, "separate query/key weights of different input sizes (kdim/vdim) are not capped"
        parameters = (weight, bias)
        d_q = d_k = embed // heads
        shapes_fit = weight.dim() == 2 and weight.shape[out_dim] == 3 * embed
        q_side = k_side = ((weight, out_dim), (bias, 0))
        q_start = [h * d_q for h in range(heads)]
        k_start = [embed + h * d_k for h in range(heads)]
    if not all(_is_local_tensor(p) for p in parameters):
        return None, "its projections are not plain tensors (a DTensor shard, a quantized weight)"
    if not shapes_fit:
        return None, "its projection weights are not the full matrices (a flattened or sharded view)"
    layout = [
        _HeadRows(_rows(q_side, q_start[h], d_q), () if k_start is None else _rows(k_side, k_start[h], d_k))
        for h in range(heads)
    ]
    return layout, ""


class AttentionLogitCap:
    """QK-clip (see the module): measure each head's largest attention logit, shrink the heads above ``cap``.

    A pure-PyTorch core. The owner arms it before a training forward (:meth:`arm`), reads the per-head maxima of
    that forward as one device vector (:meth:`take`), brings them to the host together with whatever else it
    reads (every rank must act on the same numbers: reduce them with MAX across ranks first), and calls
    :meth:`apply`, which rescales in place and changes no weight when no head is above the cap.

    Args:
        model: the network.
        cap: the largest logit a head keeps (``tau``), a finite number > 0.
        attention_modules: restrict or name attention modules (see
            :func:`~lightning_gradstab.logits.sites.find_attention_sites`).
        sample_rows: sequences of the batch measured.
        sample_positions: query positions measured per sequence.

    Example::

        attention = nn.MultiheadAttention(16, 4, batch_first=True)
        cap = AttentionLogitCap(attention, cap=100.0)
        cap.arm()
        x = torch.randn(2, 8, 16)
        attention(x, x, x)
        assert cap.apply(cap.take().tolist()) == {}  # no head of a fresh layer is near 100
    """

    def __init__(
        self,
        model: nn.Module,
        cap: float = DEFAULT_CAP,
        attention_modules: Sequence[str] | Mapping[str, tuple[str, str]] | None = None,
        sample_rows: int = 2,
        sample_positions: int = 64,
    ) -> None:
        self.cap = check_positive(cap, "cap")
        self.skipped: dict[str, str] = {}  # layer -> why it is not capped
        sites, self._layouts = [], []
        for site in find_attention_sites(model, attention_modules):
            if site.has_qk_norm:
                continue  # the logits are bounded by the norm's gains already
            layout, reason = _layout(site)
            if layout is None:
                self.skipped[site.name] = reason
                continue
            sites.append(site)
            self._layouts.append(layout)
        self.watch = LogitWatch(
            model, sample_rows=sample_rows, sample_positions=sample_positions, per_head=True, watch_output=False,
            sites=sites,
        )

    @property
    def layer_names(self) -> list[str]:
        """The capped attention layers, in the order of :meth:`take`'s vector."""
        return self.watch.layer_names

    @property
    def heads(self) -> int:
        """The length of :meth:`take`'s vector: the query heads of every capped layer."""
        return sum(len(layout) for layout in self._layouts)

    def arm(self) -> None:
        """Measure the next training forward (and every one until :meth:`take`)."""
        self.watch.active = True

    @property
    def armed(self) -> bool:
        """Whether a measurement is pending (armed, not yet taken)."""
        return self.watch.active

    def take(self, device: torch.device | None = None) -> Tensor:
        """Each capped head's largest logit in the measured forward (0 for a layer that did not run), one
        float32 vector on the device, and disarm."""
        measured = self.watch.take_per_head()
        device = next((t.device for t in measured if t is not None), device or torch.device("cpu"))
        parts = [
            torch.zeros(len(layout), device=device) if values is None else values.to(device, torch.float32)
            for values, layout in zip(measured, self._layouts, strict=True)
        ]
        return torch.cat(parts) if parts else torch.zeros(0, device=device)

    def apply(self, logits: Sequence[float]) -> dict[str, float]:
        """Rescale the heads whose logit in ``logits`` (host floats, :meth:`take`'s order, identical on every
        rank) is above the cap; returns ``{layer: its largest logit}`` for the layers changed. A non-finite
        logit is left to the guard's non-finite rules (no finite factor undoes it)."""
        if len(logits) != self.heads:
            raise ValueError(f"`logits` has {len(logits)} values, the capped layers have {self.heads} heads")
        changed: dict[str, float] = {}
        position = 0
        with torch.no_grad():
            for name, layout in zip(self.layer_names, self._layouts, strict=True):
                for rows in layout:
                    logit = float(logits[position])
                    position += 1
                    if not (math.isfinite(logit) and logit > self.cap) or logit >= torch.finfo(torch.float32).max:
                        continue
                    gamma = self.cap / logit
                    query_factor, key_factor = (gamma, 1.0) if not rows.key else (math.sqrt(gamma),) * 2
                    _scale(rows.query, query_factor)
                    _scale(rows.key, key_factor)
                    changed[name] = max(changed.get(name, 0.0), logit)
        return changed

    def remove(self) -> None:
        """Detach the hooks."""
        self.watch.remove()


def _scale(rows: tuple[_Slice, ...], factor: float) -> None:
    if factor == 1.0:
        return
    for parameter, dim, start, count in rows:
        parameter.data.narrow(dim, start, count).mul_(factor)
