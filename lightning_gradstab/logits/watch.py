"""The logit watch: forward hooks that measure the attention logits and the output log-partition on chosen steps.

:class:`LogitWatch` measures both with forward hooks, only on the steps its owner switches it on (the advisor does
so every ``k`` steps); a measurement stays on the device until the owner asks for the findings. Which modules it
hooks is :mod:`~lightning_gradstab.logits.sites`'s answer.

Measurements, per recorded step: for each attention layer, ``max |q . k| / sqrt(d_head)`` over every head, the
first ``sample_rows`` sequences of the batch, ``sample_positions`` query positions spread evenly over the sequence
and every key (the causal mask does not change the logits' scale); for the output layer, the mean over positions
of ``logsumexp(logits)``. The rules that turn them into findings are
:func:`~lightning_gradstab.logits.rules.attention_logit_findings` and
:func:`~lightning_gradstab.logits.rules.output_logit_findings` (their thresholds and why are documented there).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_gradstab.logits.rules import attention_logit_findings, output_logit_findings
from lightning_gradstab.logits.sites import AttentionSite, find_attention_sites, find_output_module
from lightning_gradstab.report import Finding


def _split_heads(x: Tensor, heads: int) -> Tensor:
    return x.reshape(*x.shape[:-1], heads, x.shape[-1] // heads)  # [..., T, H, d]


def _apply_norm(norm: nn.Module | None, x: Tensor, heads: int) -> Tensor:
    """``x``: [B, T, H*d]; a norm sized for one head is applied per head, one sized for the projection to all."""
    if norm is None:
        return _split_heads(x, heads)
    weight = getattr(norm, "weight", None)
    shape = getattr(norm, "normalized_shape", None)
    size = int(shape[-1]) if shape else (int(weight.shape[-1]) if isinstance(weight, Tensor) else x.shape[-1])
    if size == x.shape[-1]:
        return _split_heads(norm(x), heads)
    return norm(_split_heads(x, heads))


def max_attention_logit(q: Tensor, k: Tensor, sample_positions: int) -> Tensor:
    """``max |q . k| / sqrt(d)`` over heads, the rows given and ``sample_positions`` evenly spread query positions.

    ``q``: [B, T, H, d]; ``k``: [B, T, H_kv, d] (grouped keys are repeated to ``H`` heads). Returns a float32
    scalar on the device.

    Example::

        max_attention_logit(torch.ones(1, 4, 1, 4), torch.ones(1, 4, 1, 4), 2)  # tensor(2.)
    """
    return max_attention_logit_per_head(q, k, sample_positions).amax()


def max_attention_logit_per_head(q: Tensor, k: Tensor, sample_positions: int) -> Tensor:
    """:func:`max_attention_logit` for each query head: a float32 vector ``[H]`` on the device.

    Example::

        max_attention_logit_per_head(torch.ones(1, 4, 2, 4), torch.ones(1, 4, 1, 4), 2)  # tensor([2., 2.])
    """
    length = q.shape[1]
    rows = torch.linspace(0, length - 1, min(sample_positions, length), device=q.device).round().long().unique()
    q = q[:, rows].float()
    k = k.float()
    if k.shape[2] != q.shape[2]:
        k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    return logits.abs().amax(dim=(0, 2, 3))


class LogitWatch:
    """Forward hooks that measure the max attention logit per layer and the output log-partition on chosen steps.

    A pure-PyTorch core (no Lightning): the owner sets :attr:`active` before a training forward it wants measured
    and calls :meth:`record` after it; values stay on the device until :meth:`findings` or :meth:`state_dict`.

    Args:
        model: the network.
        attention_modules: restrict or name attention modules (see :func:`find_attention_sites`).
        output_module: the name of the output layer (see :func:`find_output_module`).
        sample_rows: sequences of the batch measured.
        sample_positions: query positions measured per sequence.
        per_head: keep each head's max logit (read with :meth:`take_per_head`, what
            :class:`~lightning_gradstab.logits.qk_clip.AttentionLogitCap` acts on) instead of each layer's.
        watch_output: measure the output layer's log-partition too.
        sites: attention layers already found (their owner filtered :func:`find_attention_sites`'s answer);
            ``attention_modules`` is then not read.

    Example::

        watch = LogitWatch(model, sample_positions=32)  # finds attention layers and the output layer
        watch.active = True                             # measure the next training forward
        watch.record(step=0)                            # after it: keep what it saw
        findings = watch.findings()
    """

    def __init__(
        self,
        model: nn.Module,
        attention_modules: Sequence[str] | Mapping[str, tuple[str, str]] | None = None,
        output_module: str | None = None,
        sample_rows: int = 2,
        sample_positions: int = 64,
        *,
        per_head: bool = False,
        watch_output: bool = True,
        sites: Sequence[AttentionSite] | None = None,
    ) -> None:
        for value, argument in ((sample_rows, "sample_rows"), (sample_positions, "sample_positions")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{argument}` must be an int >= 1, got {value!r}")
        self.sites = list(sites) if sites is not None else find_attention_sites(model, attention_modules)
        self.output = find_output_module(model, output_module) if watch_output else None
        self.per_head = per_head
        self.sample_rows, self.sample_positions = sample_rows, sample_positions
        self.active = False
        self.steps: list[int] = []
        self.max_logits: list[Tensor] = []  # per recorded step: [L] float32
        self.log_partition: list[Tensor] = []  # per recorded step: scalar float32
        self.seq_len: int | None = None
        self._current: dict[int, Tensor] = {}
        self._captured: dict[int, dict[str, Tensor]] = {}
        self._partition: Tensor | None = None
        self._handles: list[Any] = []
        for index, site in enumerate(self.sites):
            self._hook_site(index, site)
        if self.output is not None:
            self._handles.append(self.output.register_forward_hook(self._on_output))

    @property
    def layer_names(self) -> list[str]:
        """The measured attention layers, in the order of each row of :attr:`max_logits`."""
        return [site.name for site in self.sites]

    @property
    def qk_normalized(self) -> list[bool]:
        """Per measured layer, whether it already has a qk-norm."""
        return [site.has_qk_norm for site in self.sites]

    def _measuring(self, module: nn.Module) -> bool:
        return self.active and module.training and torch.is_grad_enabled()

    def _hook_site(self, index: int, site: AttentionSite) -> None:
        if site.kind == "mha":
            self._handles.append(site.module.register_forward_pre_hook(
                lambda m, args, kwargs: self._on_mha(index, site, args, kwargs), with_kwargs=True))
        elif site.kind == "fused":
            self._handles.append(site.query.register_forward_hook(  # type: ignore[union-attr]
                lambda m, args, out: self._on_fused(index, site, m, out)))
        else:
            self._handles.append(site.query.register_forward_hook(  # type: ignore[union-attr]
                lambda m, args, out: self._on_separate(index, site, m, "q", out)))
            self._handles.append(site.key.register_forward_hook(  # type: ignore[union-attr]
                lambda m, args, out: self._on_separate(index, site, m, "k", out)))

    def _store(self, index: int, site: AttentionSite, q: Tensor, k: Tensor) -> None:
        with torch.no_grad():
            q = _apply_norm(site.q_norm, q[: self.sample_rows].detach(), site.num_heads)
            k = _apply_norm(site.k_norm, k[: self.sample_rows].detach(), site.num_kv_heads)
            self.seq_len = int(k.shape[1])  # the attended length: the keys a query's softmax spreads over
            measure = max_attention_logit_per_head if self.per_head else max_attention_logit
            logit = measure(q, k, self.sample_positions)
            earlier = self._current.get(index)  # a layer applied several times (shared weights): the largest
            self._current[index] = logit if earlier is None else torch.maximum(earlier, logit)

    def _on_fused(self, index: int, site: AttentionSite, module: nn.Module, out: Tensor) -> None:
        if self._measuring(module) and out.ndim == 3:
            q, k, _ = out.chunk(3, dim=-1)
            self._store(index, site, q, k)

    def _on_separate(self, index: int, site: AttentionSite, module: nn.Module, which: str, out: Tensor) -> None:
        if not (self._measuring(module) and out.ndim == 3):
            return
        captured = self._captured.setdefault(index, {})
        captured[which] = out.detach()
        if "q" in captured and "k" in captured:
            self._store(index, site, captured.pop("q"), captured.pop("k"))

    def _on_mha(self, index: int, site: AttentionSite, args: tuple, kwargs: dict) -> None:
        module = cast(nn.MultiheadAttention, site.module)  # _site gives only an nn.MultiheadAttention kind "mha"
        if not self._measuring(module):
            return
        query = args[0] if args else kwargs["query"]
        key = args[1] if len(args) > 1 else kwargs["key"]
        if not module.batch_first:
            query, key = query.transpose(0, 1), key.transpose(0, 1)
        embed = module.embed_dim
        if module.in_proj_weight is not None:
            w_q, w_k = module.in_proj_weight[:embed], module.in_proj_weight[embed : 2 * embed]
        else:
            w_q, w_k = module.q_proj_weight, module.k_proj_weight
        bias = module.in_proj_bias
        b_q, b_k = (None, None) if bias is None else (bias[:embed], bias[embed : 2 * embed])
        with torch.no_grad():
            self._store(index, site, F.linear(query[: self.sample_rows], w_q, b_q),
                        F.linear(key[: self.sample_rows], w_k, b_k))

    def _on_output(self, module: nn.Module, args: tuple, out: Any) -> None:
        if self._measuring(module) and isinstance(out, Tensor) and out.ndim >= 2:
            with torch.no_grad():
                self._partition = torch.logsumexp(out.detach().float(), dim=-1).mean()

    def record(self, step: int) -> None:
        """Keep what the last measured forward saw as step ``step`` and switch the watch off until re-armed."""
        self.active = False
        if not self._current and self._partition is None:
            return
        nan = torch.tensor(math.nan)
        device = next(iter(self._current.values())).device if self._current else self._partition.device  # type: ignore[union-attr]
        row = [self._current.get(i, nan.to(device)) for i in range(len(self.sites))]
        self.steps.append(int(step))
        self.max_logits.append(torch.stack(row) if row else torch.zeros(0, device=device))
        self.log_partition.append(self._partition if self._partition is not None else nan.to(device))
        self._current, self._captured, self._partition = {}, {}, None

    def take_per_head(self) -> list[Tensor | None]:
        """Per attention layer, the max logit of each head in the last measured forward (``None``: the layer did
        not run), and switch the watch off until re-armed (``per_head=True`` watches only)."""
        self.active = False
        taken = [self._current.get(index) for index in range(len(self.sites))]
        self._current, self._captured = {}, {}
        return taken

    def remove(self) -> None:
        """Detach every hook (the model runs as if the watch never existed)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def history(self) -> tuple[list[int], list[list[float]], list[float]]:
        """``(steps, max logits [step][layer], log-partition [step])`` as host values (one transfer)."""
        if not self.steps:
            return [], [], []
        logits = torch.stack([m.cpu() for m in self.max_logits]).tolist()
        partition = torch.stack([z.cpu() for z in self.log_partition]).tolist()
        return list(self.steps), logits, partition

    def findings(self, seq_len: int | None = None) -> list[Finding]:
        """Both rules on the history so far (``seq_len``: the attended length; by default the measured one)."""
        steps, logits, partition = self.history()
        length = seq_len or self.seq_len or 2
        # a softmax over one key is constant: its logits cannot collapse it, whatever their size
        attention = []
        if length >= 2:
            attention = attention_logit_findings(self.layer_names, self.qk_normalized, steps, logits, length)
        return attention + (
            output_logit_findings(steps, partition) if self.output is not None else []
        )

    def state_dict(self) -> dict[str, Any]:
        """The measured history, on the host."""
        steps, logits, partition = self.history()
        return {"layers": self.layer_names, "steps": steps, "max_logits": logits, "log_partition": partition,
                "seq_len": self.seq_len}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Continue a history saved by :meth:`state_dict` (the same attention layers, in the same order)."""
        if list(state_dict.get("layers", [])) != self.layer_names:
            raise ValueError(
                f"`state_dict` watched layers {state_dict.get('layers')!r}, this model has {self.layer_names!r}"
            )
        self.steps = [int(s) for s in state_dict["steps"]]
        self.max_logits = [torch.tensor(row, dtype=torch.float32) for row in state_dict["max_logits"]]
        self.log_partition = [torch.tensor(z, dtype=torch.float32) for z in state_dict["log_partition"]]
        self.seq_len = state_dict.get("seq_len")
