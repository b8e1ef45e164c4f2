"""Which modules of a model the logit watch measures: its attention layers and its output layer.

What is recognised as an attention module (:func:`find_attention_sites`):

- ``torch.nn.MultiheadAttention``: queries and keys recomputed from the module's inputs with its ``in_proj``
  weights (``batch_first`` honoured);
- a module with separate query and key ``nn.Linear`` children named ``q_proj``/``k_proj`` (Hugging Face
  Llama, Mistral, Qwen, OPT, ...), ``query``/``key`` (BERT, ViT), ``wq``/``wk`` or ``to_q``/``to_k``;
  grouped-query attention is handled by repeating the key heads;
- a module with one fused ``nn.Linear`` (or GPT-2's ``Conv1D``) child named ``qkv``, ``c_attn``, ``Wqkv``,
  ``in_proj`` or ``qkv_proj`` whose output is ``[q | k | v]`` concatenated along the last dimension (nanoGPT,
  Hugging Face GPT-2, MPT).
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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

SEPARATE_QK_NAMES: tuple[tuple[str, str], ...] = (
    ("q_proj", "k_proj"), ("query", "key"), ("wq", "wk"), ("to_q", "to_k")
)
FUSED_QKV_NAMES: tuple[str, ...] = ("qkv", "c_attn", "Wqkv", "in_proj", "qkv_proj")
QK_NORM_NAMES: tuple[tuple[str, str], ...] = (
    ("q_norm", "k_norm"), ("q_layernorm", "k_layernorm"), ("query_norm", "key_norm"), ("q_ln", "k_ln")
)
HEAD_ATTRIBUTES: tuple[str, ...] = ("num_heads", "n_head", "n_heads", "num_attention_heads")
OUTPUT_NAMES: tuple[str, ...] = ("lm_head", "head", "output", "embed_out")


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


def fused_width(module: nn.Module | None) -> int | None:
    """The output width of a fused ``[q | k | v]`` projection: an ``nn.Linear``'s ``out_features``, or the ``nf`` of
    a GPT-2-style ``Conv1D`` (Hugging Face's, whose weight is ``[in, out]``: the transpose of a Linear's)."""
    if isinstance(module, nn.Linear):
        return module.out_features
    width = getattr(module, "nf", None)
    return width if type(module).__name__ == "Conv1D" and isinstance(width, int) else None


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
            width = fused_width(fused)
            if fused is not None and width is not None and width % 3 == 0 and heads is not None:
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
