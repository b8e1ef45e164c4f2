"""Attention- and output-logit watching: the two instabilities Wortsman et al. 2023 reproduce at small scale.

Wortsman et al. 2023 ("Small-scale proxies for large-scale Transformer training instabilities", arXiv 2309.14322)
show two ways a Transformer loses a run at a high learning rate, each with an architectural fix:

- **attention logit growth** (first reported by Dehghani et al. 2023, "Scaling Vision Transformers to 22 Billion
  Parameters"): the query-key logits ``q . k / sqrt(d)`` grow without bound, the softmax becomes one-hot (its
  entropy collapses) and the loss diverges. Fix: qk-layernorm, a LayerNorm (or RMSNorm) on the queries and keys
  before the dot product.
- **output logit divergence**: the cross-entropy does not pin the log-partition ``log Z = logsumexp(logits)`` of
  the output layer, so it drifts far from 0 and the loss becomes unstable. Fix: the z-loss ``1e-4 * log(Z)^2``
  (Chowdhery et al. 2022, PaLM), which Wortsman et al. use at 1e-4.

:class:`LogitWatch` measures both with forward hooks, only on the steps its owner switches it on (the advisor does
so every ``k`` steps); a measurement stays on the device until the owner asks for the findings.

What is recognised as an attention module (``find_attention_sites``):

- ``torch.nn.MultiheadAttention``: queries and keys recomputed from the module's inputs with its ``in_proj``
  weights (``batch_first`` honoured);
- a module with separate query and key ``nn.Linear`` children named ``q_proj``/``k_proj`` (Hugging Face
  Llama, Mistral, Qwen, OPT, ...), ``query``/``key`` (BERT, ViT), ``wq``/``wk`` or ``to_q``/``to_k``;
  grouped-query attention is handled by repeating the key heads;
- a module with one fused ``nn.Linear`` child named ``qkv``, ``c_attn``, ``Wqkv``, ``in_proj`` or
  ``qkv_proj`` whose output is ``[q | k | v]`` concatenated along the last dimension (nanoGPT, GPT-2, MPT).
  (GPT-NeoX's ``query_key_value`` interleaves heads; name such modules explicitly, see below.)

The number of heads is read from the module (``num_heads``, ``n_head``, ``n_heads``, ``num_attention_heads`` or
``config.num_attention_heads``; ``num_key_value_heads`` for grouped keys). A qk-norm is recognised as a child
named ``q_norm``/``k_norm``, ``q_layernorm``/``k_layernorm``, ``query_norm``/``key_norm`` or ``q_ln``/``k_ln``
whose class name contains ``Norm`` (LayerNorm, RMSNorm, Qwen3's and OLMo 2's norms): it is applied to the measured
queries and keys (over a head or over the whole projection, whichever its size matches), and the layer is marked
as already having the fix, so no finding names it. Rotary embeddings are not applied: a rotation keeps
``|q| |k|``, the scale of the logits, though single pairs differ.

Modules it does not recognise can be named: ``attention_modules={"blocks.0.mix": ("to_queries", "to_keys")}``
maps a module to its query and key ``nn.Linear`` children. The output layer is the child named ``lm_head``,
``head``, ``output`` or ``embed_out`` if there is one, else the last registered ``nn.Linear``; name another with
``output_module``.

Measurements, per recorded step: for each attention layer, ``max |q . k| / sqrt(d_head)`` over every head, the
first ``sample_rows`` sequences of the batch, ``sample_positions`` query positions spread evenly over the sequence
and every key (the causal mask does not change the logits' scale); for the output layer, the mean over positions
of ``logsumexp(logits)``. The rules that turn them into findings are :func:`attention_logit_findings` and
:func:`output_logit_findings` (their thresholds and why are documented there).

Example::

    watch = LogitWatch(model)           # finds the attention layers and the output layer
    watch.active = True                 # measure the next training forward
    loss = model(batch).loss; watch.record(step=0)
    findings = watch.findings(seq_len=64)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_gradstab.report import Finding

SEPARATE_QK_NAMES: tuple[tuple[str, str], ...] = (
    ("q_proj", "k_proj"), ("query", "key"), ("wq", "wk"), ("to_q", "to_k")
)
FUSED_QKV_NAMES: tuple[str, ...] = ("qkv", "c_attn", "Wqkv", "in_proj", "qkv_proj")
QK_NORM_NAMES: tuple[tuple[str, str], ...] = (
    ("q_norm", "k_norm"), ("q_layernorm", "k_layernorm"), ("query_norm", "key_norm"), ("q_ln", "k_ln")
)
HEAD_ATTRIBUTES: tuple[str, ...] = ("num_heads", "n_head", "n_heads", "num_attention_heads")
OUTPUT_NAMES: tuple[str, ...] = ("lm_head", "head", "output", "embed_out")

SOFTMAX_MASS = 0.999
"""The attention weight at which a query's softmax counts as one-hot (entropy collapsed)."""

BF16_RESOLUTION_LOGIT = 256.0
"""``2**8``: above this magnitude bfloat16's 8-bit significand spaces representable logits 1 nat or more apart
(``256 * 2**-8``), so the attention weights are set by rounding, in steps of ``e``."""

GROWTH_FACTOR = 2.0
"""Rise of the max attention logit from the first to the last third of the watched window that counts as still
growing (a doubling) rather than settled."""

Z_LOSS_DRIFT = 20.0
"""Drift of the mean log-partition (nats) that counts as output logit divergence; see :func:`output_logit_findings`."""


def collapse_logit(seq_len: int) -> float:
    """The logit gap at which one key takes ``SOFTMAX_MASS`` of a query's attention against ``seq_len - 1`` keys at
    logit 0: ``log((T - 1) * m / (1 - m))``; 11.0 at T = 64, 14.5 at T = 2048. Above it the softmax is one-hot and
    its gradient (``p (1 - p)``) is below 1e-3: Dehghani et al.'s attention entropy collapse.

    Example::

        round(collapse_logit(64), 1)  # 11.0
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"`seq_len` must be an int >= 2, got {seq_len!r}")
    return math.log((seq_len - 1) * SOFTMAX_MASS / (1.0 - SOFTMAX_MASS))


def growth_logit_level(seq_len: int) -> float:
    """The max attention logit above which growth is named: ``max(collapse_logit(T), 256)``.

    A single sharp head (an induction or previous-token head) is one-hot by design, so the one-hot level alone
    (11 at T = 64) would name healthy models; 256 is where the logits leave the range any attention pattern
    needs (every query one-hot for ``T`` up to ``e**256``) and where bfloat16 attention can no longer tell
    logits 1 nat apart (:data:`BF16_RESOLUTION_LOGIT`). Wortsman et al. 2023 see the unstable runs' max logits
    reach 1e3-1e4 and the stable ones stay far below (their attention-logit figures).

    Example::

        growth_logit_level(64)  # 256.0
    """
    return max(collapse_logit(seq_len), BF16_RESOLUTION_LOGIT)


@dataclass
class AttentionSite:
    """One attention layer the watch measures: how its queries and keys are reached and whether it has a qk-norm."""

    name: str
    module: nn.Module
    kind: str  # "mha", "separate" or "fused"
    num_heads: int
    num_kv_heads: int
    query: nn.Module | None = None
    key: nn.Module | None = None
    q_norm: nn.Module | None = None
    k_norm: nn.Module | None = None

    @property
    def has_qk_norm(self) -> bool:
        """Whether the layer already normalizes its queries and keys (the fix for attention logit growth)."""
        return self.q_norm is not None and self.k_norm is not None


def _heads(module: nn.Module) -> tuple[int | None, int | None]:
    heads = next((getattr(module, a) for a in HEAD_ATTRIBUTES if isinstance(getattr(module, a, None), int)), None)
    config: Any = getattr(module, "config", None)  # a model config when present; None has no num_attention_heads
    if heads is None and isinstance(getattr(config, "num_attention_heads", None), int):
        heads = config.num_attention_heads
    kv = getattr(module, "num_key_value_heads", None) or getattr(config, "num_key_value_heads", None)
    return heads, kv if isinstance(kv, int) else heads


def _is_norm(module: nn.Module | None) -> bool:
    return module is not None and "Norm" in type(module).__name__


def _qk_norms(module: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    children = dict(module.named_children())
    for q_name, k_name in QK_NORM_NAMES:
        if _is_norm(children.get(q_name)) and _is_norm(children.get(k_name)):
            return children[q_name], children[k_name]
    return None, None


def _site(name: str, module: nn.Module, qk_children: tuple[str, str] | None = None) -> AttentionSite | None:
    children = dict(module.named_children())
    q_norm, k_norm = _qk_norms(module)
    if isinstance(module, nn.MultiheadAttention):
        return AttentionSite(name, module, "mha", module.num_heads, module.num_heads)
    heads, kv_heads = _heads(module)
    pairs = [qk_children] if qk_children is not None else list(SEPARATE_QK_NAMES)
    for q_name, k_name in pairs:
        q, k = children.get(q_name), children.get(k_name)
        if isinstance(q, nn.Linear) and isinstance(k, nn.Linear):
            if heads is None:
                heads = kv_heads = 1 if qk_children is not None else None
            if heads is None:
                return None
            return AttentionSite(name, module, "separate", heads, kv_heads or heads, q, k, q_norm, k_norm)
    if qk_children is None:
        for fused_name in FUSED_QKV_NAMES:
            fused = children.get(fused_name)
            if isinstance(fused, nn.Linear) and fused.out_features % 3 == 0 and heads is not None:
                return AttentionSite(name, module, "fused", heads, heads, fused, None, q_norm, k_norm)
    return None


def find_attention_sites(
    model: nn.Module, attention_modules: Sequence[str] | Mapping[str, tuple[str, str]] | None = None
) -> list[AttentionSite]:
    """The attention layers of ``model`` the watch can measure (see the module docstring for what is recognised).

    ``attention_modules``: restrict to these module names, or map names to their ``(query, key)`` Linear children
    for modules that are not recognised; a name that is not a module, or not measurable, raises ``ValueError``.

    Example::

        [site.name for site in find_attention_sites(gpt)]  # ["blocks.0.attention", "blocks.1.attention"]
    """
    modules = dict(model.named_modules())
    if attention_modules is None:
        sites = [_site(name, module) for name, module in modules.items()]
        return [site for site in sites if site is not None]
    if isinstance(attention_modules, str) or not isinstance(attention_modules, (Sequence, Mapping)):
        raise TypeError(f"`attention_modules` must be a list of module names or a mapping, got {attention_modules!r}")
    named = attention_modules if isinstance(attention_modules, Mapping) else dict.fromkeys(attention_modules)
    found = []
    for name, qk_children in named.items():
        if name not in modules:
            raise ValueError(f"`attention_modules`: {name!r} is not a module of the model")
        site = _site(name, modules[name], None if qk_children is None else tuple(qk_children))
        if site is None:
            raise ValueError(
                f"`attention_modules`: {name!r} ({type(modules[name]).__name__}) is not a recognised attention "
                "module; map it to its (query, key) nn.Linear children, e.g. {name: ('wq', 'wk')}"
            )
        found.append(site)
    return found


def find_output_module(model: nn.Module, output_module: str | None = None) -> nn.Module | None:
    """The layer whose outputs are the logits: ``output_module`` by name, else a child named ``lm_head``/``head``/
    ``output``/``embed_out``, else the last registered ``nn.Linear`` (None if the model has none)."""
    modules = dict(model.named_modules())
    if output_module is not None:
        if output_module not in modules:
            raise ValueError(f"`output_module`: {output_module!r} is not a module of the model")
        return modules[output_module]
    for name in OUTPUT_NAMES:
        if isinstance(modules.get(name), nn.Linear):
            return modules[name]
    linears = [m for m in modules.values() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


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
    length = q.shape[1]
    rows = torch.linspace(0, length - 1, min(sample_positions, length), device=q.device).round().long().unique()
    q = q[:, rows].float()
    k = k.float()
    if k.shape[2] != q.shape[2]:
        k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    return logits.abs().amax()


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
    ) -> None:
        for value, argument in ((sample_rows, "sample_rows"), (sample_positions, "sample_positions")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{argument}` must be an int >= 1, got {value!r}")
        self.sites = find_attention_sites(model, attention_modules)
        self.output = find_output_module(model, output_module)
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
            self._current[index] = max_attention_logit(q, k, self.sample_positions)

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


def attention_logit_findings(
    layers: Sequence[str],
    qk_normalized: Sequence[bool],
    steps: Sequence[int],
    max_logits: Sequence[Sequence[float]],
    seq_len: int,
    growth_factor: float = GROWTH_FACTOR,
) -> list[Finding]:
    """``attention.logit_growth`` for the layers whose max attention logit grew into softmax saturation.

    A layer is named when (a) its last three measurements (a sustained level, not one batch) are all at or above
    :func:`growth_logit_level` and (b) the median of the last third of its measurements is at least
    ``growth_factor`` (2x) the median of the first third: still growing over the run, the trend Dehghani et al.
    2023 ("grow without bound") and Wortsman et al. 2023 (max attention logit against steps) saw before
    divergence, where a stable run's logits settle. Layers with a qk-norm are never named: they already have the
    fix. Non-finite measurements are skipped; fewer than six finite ones name nothing.

    Example::

        attention_logit_findings(["attn"], [False], list(range(6)), [[1.0], [50], [100], [300], [600], [900]], 64)
    """
    level = growth_logit_level(seq_len)
    named, evidence = [], {}
    for column, (layer, normalized) in enumerate(zip(layers, qk_normalized, strict=True)):
        series = [(s, row[column]) for s, row in zip(steps, max_logits, strict=True) if math.isfinite(row[column])]
        if normalized or len(series) < 6:
            continue
        values = [value for _, value in series]
        third = len(values) // 3
        early, late = _median(values[:third]), _median(values[-third:])
        if min(values[-3:]) >= level and late >= growth_factor * early:
            named.append(layer)
            evidence[layer] = {"early_max_logit": round(early, 4), "late_max_logit": round(late, 4),
                               "last_max_logit": round(values[-1], 4), "last_step": series[-1][0]}
    if not named:
        return []
    worst = max(evidence.values(), key=lambda e: e["last_max_logit"])
    return [Finding(
        "attention.logit_growth", "warning", tuple(named),
        {"max_attention_logit": worst["last_max_logit"], "early_max_attention_logit": worst["early_max_logit"],
         "level": level, "one_hot_logit": round(collapse_logit(seq_len), 2), "seq_len": seq_len,
         "layers": evidence},
        f"The max attention logit of {len(named)} layer(s) kept growing, to {worst['last_max_logit']:.3g} (from "
        f"{worst['early_max_logit']:.3g} early on; a softmax is one-hot from {collapse_logit(seq_len):.3g}): add "
        "qk-layernorm, a LayerNorm on the queries and keys before their dot product (Dehghani et al. 2023; "
        "Wortsman et al. 2023), or lower the learning rate.",
    )]


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else math.nan


def output_logit_findings(
    steps: Sequence[int], log_partition: Sequence[float], drift: float = Z_LOSS_DRIFT
) -> list[Finding]:
    """``output.logit_divergence`` when the output log-partition drifted far from where it started and stayed there.

    The cross-entropy is invariant to adding a constant to every logit, so nothing pins ``log Z`` and at a high
    learning rate it can drift; Wortsman et al. 2023 show the loss then diverges, which PaLM's z-loss prevents by
    pulling ``log Z`` to 0. Named when ``|log Z - log Z_first|`` is at least ``drift`` (20 nats) at each of the
    last three measurements and in the median of the last third (sustained, not one batch). Why 20 nats: at that
    size the logits are at least ~20 in magnitude, where bfloat16's 8-bit significand resolves them only to ~0.08,
    the size of a late-training loss improvement, and ``softmax`` needs the max subtracted to stay finite in
    half precision; a model with z-loss keeps ``log Z`` within a few nats of 0. Fewer than six finite
    measurements name nothing.

    Example::

        output_logit_findings(list(range(6)), [4.5, -2.0, -10.0, -20.0, -30.0, -40.0])
    """
    series = [(s, z) for s, z in zip(steps, log_partition, strict=True) if math.isfinite(z)]
    if len(series) < 6:
        return []
    first = series[0][1]
    drifts = [abs(z - first) for _, z in series]
    if min(drifts[-3:]) < drift or _median(drifts[-(len(drifts) // 3):]) < drift:
        return []
    return [Finding(
        "output.logit_divergence", "warning", (),
        {"log_partition_first": round(first, 4), "log_partition_last": round(series[-1][1], 4),
         "drift_nats": round(drifts[-1], 4), "first_step": series[0][0], "last_step": series[-1][0]},
        f"The output logits' log-partition drifted {drifts[-1]:.3g} nats from {first:.3g} and stayed away: add "
        "a z-loss, 1e-4 * logsumexp(logits)^2 (Chowdhery et al. 2022, PaLM; Wortsman et al. 2023), or use weight "
        "decay / a lower learning rate.",
    )]
