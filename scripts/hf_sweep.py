"""Robustness sweep of ``diagnose()`` on Hugging Face ``transformers`` architectures at random init.

Every model type of six ``transformers`` auto mappings (causal LM, image classification, sequence classification,
CTC, audio classification, masked LM; the first mapping in that order gives the class) is built from its config
class's defaults made tiny (width 64, 2 layers, 4 heads, FFN 128, vocab 128, one layer of each kind kept), run
through one plain forward + backward on the first candidate batch that works, then through ``diagnose(model,
batch)``. One JSON line per model goes to the results file: status, config overrides, parameter count, batch
shapes, timings (plain forward + backward and diagnose, best of 3; their ratio is diagnose()'s cost), findings, and
a plain-backward gradient profile (per-layer gradient RMS) to check suspicious findings against. The types the
test zoo (``tests/zoo``) already builds are left out unless named with ``--only``.
``--mappings more`` sweeps the model types that only fifteen further mappings hold (object detection,
segmentation, depth, video, keypoints, zero-shot towers, encoder-decoders, speech-to-text, ...; results in
``benchmarks/results/hf-sweep-more.jsonl``), each batch also tried with the other inputs its forward takes.
``--mappings multimodal`` sweeps the vision-language models of the image-text-to-text mapping (results in
``benchmarks/results/hf-sweep-multimodal.jsonl``): text ids hold as many image tokens as the model's own mismatch
error says the image gives.

The driver starts a worker process that handles the models one by one; build, plain step and diagnose each have
a SIGALRM timeout, and a model that hangs past ``HARD_TIMEOUT`` (outside Python, where SIGALRM cannot stop it) gets
its worker killed and a fresh worker continues with the next model. A results file that already exists is resumed:
the types it holds are skipped. At the end ``run`` writes a Markdown summary next to the results (same stem,
``.md``); ``summary`` rewrites it from an existing results file. The default results file is
``benchmarks/results/hf-sweep.jsonl`` (summary ``hf-sweep.md``); what the workers print goes to ``FILE.jsonl.log``.

Needs ``transformers``; downloads nothing (every model is built from a config at random init, with the Hub set
offline) and never imports torchvision. Run from the repository root:

    OMP_NUM_THREADS=1 python scripts/hf_sweep.py list                   # the candidates, type|class|mapping
    OMP_NUM_THREADS=1 python scripts/hf_sweep.py run [--out FILE.jsonl] [--budget SECONDS] [--only TYPE,TYPE]
    OMP_NUM_THREADS=1 python scripts/hf_sweep.py run --mappings more    # detection, segmentation, depth, video,
                                                                         # encoder-decoders, speech-to-text, ...
    OMP_NUM_THREADS=1 python scripts/hf_sweep.py run --mappings multimodal  # vision-language models
    python scripts/hf_sweep.py summary [--out FILE.jsonl]                # rewrite FILE.md from FILE.jsonl
"""

from __future__ import annotations

import argparse
import collections
import datetime
import gc
import inspect
import json
import math
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn, TypeGuard, TypeVar

from sweep_records import cpu_name  # scripts/sweep_records.py: run as python scripts/<name>.py

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_OUT = ROOT / "benchmarks/results/hf-sweep.jsonl"
DEFAULT_BUDGET = 40 * 60
DIAGNOSE_TIMEOUT = 60
BUILD_TIMEOUT = 60
HARD_TIMEOUT = 240

MAPPINGS = [
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
    "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "MODEL_FOR_CTC_MAPPING_NAMES",
    "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES",
    "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
]
# ``--mappings more``: the vision, speech and sequence-to-sequence heads whose model types none of MAPPINGS has
# (detection, segmentation, depth, video, keypoints, zero-shot towers, encoder-decoders, speech-to-text)
MORE_MAPPINGS = [
    "MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES",
    "MODEL_FOR_DEPTH_ESTIMATION_MAPPING_NAMES",
    "MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES",
    "MODEL_FOR_UNIVERSAL_SEGMENTATION_MAPPING_NAMES",
    "MODEL_FOR_INSTANCE_SEGMENTATION_MAPPING_NAMES",
    "MODEL_FOR_VIDEO_CLASSIFICATION_MAPPING_NAMES",
    "MODEL_FOR_KEYPOINT_DETECTION_MAPPING_NAMES",
    "MODEL_FOR_IMAGE_TO_IMAGE_MAPPING_NAMES",
    "MODEL_FOR_BACKBONE_MAPPING_NAMES",
    "MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION_MAPPING_NAMES",
    "MODEL_FOR_ZERO_SHOT_OBJECT_DETECTION_MAPPING_NAMES",
    "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES",
    "MODEL_FOR_TEXT_RECOGNITION_MAPPING_NAMES",
    "MODEL_FOR_TIME_SERIES_CLASSIFICATION_MAPPING_NAMES",
]
MORE_OUT = ROOT / "benchmarks/results/hf-sweep-more.jsonl"
# ``--mappings multimodal``: vision-language models (an image encoder, a projector and a language model), fed
# text ids holding as many image tokens as the image gives features (the count is read from the model's own
# mismatch error, then retried)
MULTIMODAL_MAPPINGS = ["MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES"]
MULTIMODAL_OUT = ROOT / "benchmarks/results/hf-sweep-multimodal.jsonl"
MULTIMODAL_NAMES = {m.replace("MODEL_FOR_", "").replace("_MAPPING_NAMES", "") for m in MULTIMODAL_MAPPINGS}
IMAGE_TOKEN = 5  # a spare id inside the tiny vocabulary, for models whose image token id lies outside it
MORE_NAMES = {m.replace("MODEL_FOR_", "").replace("_MAPPING_NAMES", "") for m in MORE_MAPPINGS}

# model types the project's zoo (tests/zoo STOCK, STOCK_WIDER, GOOD, GOOD_WIDER, BROKEN) already builds
ZOO_TYPES = {
    "gpt2", "bert", "roberta", "distilbert", "albert", "electra", "llama", "mistral", "qwen2", "gemma", "gpt_neo",
    "opt", "gpt_neox", "bloom", "t5", "bart", "vit", "deit", "beit", "dinov2", "swin", "convnext", "convnextv2",
    "resnet", "regnet", "bit", "mobilenet_v1", "mobilenet_v2", "mobilevit", "segformer", "levit", "poolformer",
    "wav2vec2", "hubert", "wavlm", "data2vec-audio", "whisper", "audio-spectrogram-transformer", "mixtral",
    "qwen2_moe", "olmoe", "gemma2", "qwen3", "olmo2", "mamba", "modernbert", "clip", "siglip", "swinv2",
    "dinov2_with_registers", "vit_mae", "focalnet", "pvt_v2", "efficientnet",
}
# need external packages / hub downloads / are wrappers, not architectures
SKIP_TYPES = {"timm_wrapper", "shieldgemma2", "layoutlmv2"}

H = 64  # width
HEADS = 4
LAYERS = 2
FFN = 128
VOCAB = 128
TEXT_SHAPE = (2, 16)
AUDIO_SAMPLES = 4000

# warnings listed in the summary next to every error
SUSPICIOUS_WARNINGS = {"signal.vanishing", "signal.exploding", "init.scale", "init.symmetric", "arch.residual"}
DIAGNOSE_FAILURES = ("diagnose exception", "diagnose timeout", "hard timeout", "worker crash")

Candidate = tuple[str, str, str]  # (model type, class name, mapping)
Batch = dict[str, "torch.Tensor"]
T = TypeVar("T")


# --------------------------------------------------------------------------------------------------- candidates


def candidates(include_zoo: bool = False, more: bool = False, multimodal: bool = False) -> list[Candidate]:
    """(model_type, class name, mapping): one class per model type, from the first mapping in MAPPINGS order;
    with ``more``, one per model type of MORE_MAPPINGS that MAPPINGS does not hold; with ``multimodal``, one per
    model type of MULTIMODAL_MAPPINGS that neither holds."""
    from transformers.models.auto import modeling_auto as auto

    if multimodal:
        covered = {c[0] for c in candidates(include_zoo=True)} | {c[0] for c in candidates(True, more=True)}
        found = []
        for mapping in MULTIMODAL_MAPPINGS:
            for model_type, names in getattr(auto, mapping).items():
                if model_type in covered or model_type in SKIP_TYPES or (not include_zoo and model_type in ZOO_TYPES):
                    continue
                class_name = names[0] if isinstance(names, (list, tuple)) else names
                found.append((model_type, class_name, mapping.replace("MODEL_FOR_", "").replace("_MAPPING_NAMES", "")))
        return found
    seen: dict[str, Candidate] = {}
    for mapping in MAPPINGS + (MORE_MAPPINGS if more else []):
        for model_type, names in getattr(auto, mapping).items():
            class_name = names[0] if isinstance(names, (list, tuple)) else names
            if model_type in seen or model_type in SKIP_TYPES:
                continue
            if not include_zoo and model_type in ZOO_TYPES:
                continue
            seen[model_type] = (model_type, class_name, mapping.replace("MODEL_FOR_", "").replace("_MAPPING_NAMES", ""))
    core = {m.replace("MODEL_FOR_", "").replace("_MAPPING_NAMES", "") for m in MAPPINGS}
    return [c for c in seen.values() if (c[2] not in core) == more]


# --------------------------------------------------------------------------------------------------- tiny configs

LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "encoder_layers", "decoder_layers",
              "num_decoder_layers", "num_encoder_layers", "num_hidden_layers_text")
WIDTH_KEYS = ("hidden_size", "d_model", "n_embd", "dim", "model_dim", "emb_dim")
HEAD_KEYS = ("num_attention_heads", "n_head", "n_heads", "encoder_attention_heads", "decoder_attention_heads",
             "num_heads")
KV_KEYS = ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num", "num_key_value_groups")
HEAD_DIM_KEYS = ("head_dim", "attention_head_size", "d_kv", "kv_channels", "d_head", "attention_head_dim")
FFN_KEYS = ("intermediate_size", "ffn_dim", "d_ff", "n_inner", "encoder_ffn_dim", "decoder_ffn_dim", "d_inner",
            "ffn_hidden_size", "dim_feedforward", "mlp_dim")
MOE_FFN_KEYS = ("moe_intermediate_size", "shared_expert_intermediate_size", "expert_intermediate_size",
                "moe_ffn_hidden_size", "expert_dim")
EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts")
TOPK_KEYS = ("num_experts_per_tok", "moe_k", "moe_topk", "num_selected_experts", "top_k_experts")
POS_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "max_sequence_length",
            "max_target_positions", "seq_length")


def _is_int(v: object) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def _keep_indices(d: dict[str, Any], layers: int) -> list[int]:
    """Which of the original layers to keep: one of each kind named by layer_types (first occurrences, order
    kept), at least LAYERS of them."""
    kinds = d.get("layer_types") or d.get("layers_block_type") or d.get("block_types")
    pattern = d.get("hybrid_override_pattern")
    if isinstance(pattern, str) and len(pattern) == layers:
        kinds = list(pattern)
    keep: list[int] = []
    if isinstance(kinds, (list, tuple)) and len(kinds) == layers:
        first: dict[str, int] = {}
        for i, k in enumerate(kinds):
            first.setdefault(json.dumps(k, sort_keys=True, default=str), i)
        keep = sorted(first.values())
    for i in range(layers):
        if len(keep) >= LAYERS:
            break
        if i not in keep:
            keep.append(i)
    return sorted(keep)


def shrink(d: dict[str, Any]) -> dict[str, Any]:
    """Overrides (keys already present in the defaults ``d``) that make the config tiny but keep its structure."""
    o: dict[str, Any] = {}

    def setif(keys: tuple[str, ...], value: Any, *, allow_none: bool = False,
              cond: Callable[[Any], bool] | None = None) -> None:
        for k in keys:
            if k in d and (d[k] is not None or allow_none) and (cond is None or cond(d[k])):
                o[k] = value(d[k]) if callable(value) else value

    orig_heads = next((d[k] for k in HEAD_KEYS if _is_int(d.get(k))), None)
    orig_width = next((d[k] for k in WIDTH_KEYS if _is_int(d.get(k))), None)
    hierarchical = any(isinstance(d.get(k), (list, tuple)) for k in ("depths", "depth", "hidden_sizes", "embed_dims"))

    setif(WIDTH_KEYS, H, cond=_is_int)
    setif(HEAD_KEYS, HEADS, cond=_is_int)

    def kv(v: int) -> int:
        if orig_heads and v == orig_heads:
            return HEADS
        return 1 if v == 1 else 2

    setif(KV_KEYS, kv, cond=_is_int)
    setif(HEAD_DIM_KEYS, H // HEADS, cond=_is_int)
    if _is_int(d.get("qk_rope_head_dim")) and _is_int(d.get("head_dim")):
        o["head_dim"] = 8  # MLA: the rotary embedding is sized by head_dim = qk_rope_head_dim
    if _is_int(d.get("expand")) and _is_int(d.get("num_heads")) and _is_int(d.get("head_dim")):
        o["head_dim"] = H * d["expand"] // HEADS  # Mamba2: hidden * expand = heads * head_dim
    setif(("entity_vocab_size", "vocab_size_per_layer_input", "shape_vocab_size", "pronunciation_vocab_size"),
          VOCAB, cond=lambda v: _is_int(v) and v > VOCAB)
    setif(("hidden_size_per_layer_input",), 16, cond=lambda v: _is_int(v) and v > 16)
    setif(("entity_emb_size", "pronunciation_embed_dim", "shape_embed_dim"), 32, cond=_is_int)
    setif(("d_latents",), H, cond=_is_int)
    setif(("num_latents",), 32, cond=lambda v: _is_int(v) and v > 32)
    setif(("num_self_attends_per_block",), LAYERS, cond=lambda v: _is_int(v) and v > LAYERS)
    setif(("num_self_attention_heads", "num_cross_attention_heads"), HEADS, cond=_is_int)
    setif(("context_size",), 32, cond=lambda v: _is_int(v) and v > 32)
    setif(("vocab_size",), VOCAB, allow_none=True, cond=lambda v: v is None)
    setif(FFN_KEYS, FFN, cond=_is_int)
    if "dim" in d and _is_int(d.get("hidden_dim")):
        o["hidden_dim"] = FFN  # distilbert-style naming (dim = width, hidden_dim = FFN)
    elif _is_int(d.get("hidden_dim")) and not any(k in d for k in WIDTH_KEYS):
        o["hidden_dim"] = H
    setif(MOE_FFN_KEYS, 64, cond=_is_int)
    setif(EXPERT_KEYS, 4, cond=lambda v: _is_int(v) and v > 1)
    setif(TOPK_KEYS, 2, cond=lambda v: _is_int(v) and v > 1)
    setif(("n_shared_experts", "num_shared_experts"), 1, cond=lambda v: _is_int(v) and v > 0)
    setif(("n_group", "topk_group", "num_expert_group"), 1, cond=_is_int)
    setif(("first_k_dense_replace", "num_dense_layers", "first_k_dense"), 1, cond=lambda v: _is_int(v) and v > 0)
    setif(("kv_lora_rank",), 16, cond=_is_int)
    setif(("q_lora_rank",), 32, cond=_is_int)
    setif(("qk_rope_head_dim",), 8, cond=_is_int)
    setif(("qk_nope_head_dim",), 8, cond=_is_int)
    setif(("v_head_dim",), 16, cond=_is_int)
    setif(("rotary_dim",), 8, cond=_is_int)
    embedding_keys = ("embedding_size", "word_embed_proj_dim", "embedding_dim")
    setif(embedding_keys, 32, cond=lambda v: _is_int(v) and v != orig_width)  # factorised embedding: stays narrower
    setif(embedding_keys, H, cond=lambda v: _is_int(v) and v == orig_width)
    setif(("sliding_window", "attention_window", "window_size", "local_attention", "sliding_window_size"),
          8, cond=lambda v: _is_int(v) and v > 8 and not hierarchical)
    setif(("vocab_size",), VOCAB, cond=lambda v: _is_int(v) and v > VOCAB)
    setif(POS_KEYS, 64, cond=lambda v: _is_int(v) and v > 64)
    setif(("max_source_positions",), 64, cond=lambda v: _is_int(v) and v > 64)
    image = 64 if hierarchical else 32
    setif(("image_size",), image, cond=_is_int)
    setif(("image_size",), lambda v: [image] * len(v), cond=lambda v: isinstance(v, (list, tuple)))
    setif(("patch_size",), 4, cond=lambda v: _is_int(v) and v > 4 and not hierarchical)
    setif(("patch_size",), lambda v: [4] * len(v),
          cond=lambda v: isinstance(v, (list, tuple)) and _is_int(v[0]) and v[0] > 4)
    setif(("conv_dim",), lambda v: [32] * len(v), cond=lambda v: isinstance(v, (list, tuple)))
    setif(("num_conv_pos_embeddings",), 16, cond=_is_int)
    setif(("num_conv_pos_embedding_groups",), 4, cond=_is_int)
    setif(("tdnn_dim",), lambda v: [32] * len(v), cond=lambda v: isinstance(v, (list, tuple)))
    setif(("xvector_output_dim", "classifier_proj_size", "projection_dim", "proj_codevector_dim", "codevector_dim"),
          32, cond=_is_int)
    setif(("num_buckets",), 32, cond=lambda v: _is_int(v) and v > 32)
    setif(("max_bucket_distance",), 64, cond=_is_int)
    setif(("state_size", "ssm_state_size", "mamba_d_state", "d_state"), 8, cond=lambda v: _is_int(v) and v > 8)
    setif(("mamba_n_heads", "ssm_num_heads"), 4, cond=_is_int)
    setif(("mamba_d_head", "ssm_head_dim", "mamba_head_dim"), 32, cond=_is_int)
    setif(("mamba_n_groups", "n_groups"), 1, cond=_is_int)
    setif(("time_step_rank",), 8, cond=_is_int)
    setif(("chunk_size", "mamba_chunk_size"), 16, cond=lambda v: _is_int(v) and v > 16)

    # hierarchical vision: stages kept, one block each, small widths
    stage_key = "depths" if isinstance(d.get("depths"), (list, tuple)) else "depth"
    if isinstance(d.get(stage_key), (list, tuple)):
        n = len(d[stage_key])
        # CvT indexes its per-stage drop-path list by stage, so stage i needs more than i blocks there
        o[stage_key] = [1] * n if stage_key == "depths" else [i + 1 for i in range(n)]
        for k in ("embed_dim", "hidden_sizes", "embed_dims"):
            if isinstance(d.get(k), (list, tuple)) and len(d[k]) == n:
                o[k] = [16 * 2**i for i in range(n)]
        if _is_int(d.get("embed_dim")):
            o["embed_dim"] = 16
        for k in ("num_heads", "num_attention_heads", "heads"):
            if isinstance(d.get(k), (list, tuple)) and len(d[k]) == n:
                o[k] = [min(2**i, max(1, d[k][i])) for i in range(n)]
        if isinstance(d.get("window_size"), int) and d["window_size"] > 4:
            o["window_size"] = 4
    elif _is_int(d.get("embed_dim")) and not any(k in o for k in WIDTH_KEYS):
        o["embed_dim"] = H

    # layer count and every per-layer list/string, keeping one layer of each kind
    for k in LAYER_KEYS:
        if _is_int(d.get(k)) and d[k] > LAYERS:
            layers = d[k]
            keep = _keep_indices(d, layers)
            o[k] = len(keep)
            for key, value in d.items():
                if key in o or key in ("depths", "depth"):
                    continue
                if isinstance(value, (list, tuple)) and len(value) == layers and layers > 2:
                    o[key] = [value[i] for i in keep]
                elif isinstance(value, str) and len(value) == layers and layers > 2 and key.endswith("pattern"):
                    o[key] = "".join(value[i] for i in keep)

    # special tokens inside the small vocabulary
    vocab = o.get("vocab_size", d.get("vocab_size"))
    if _is_int(vocab):
        spare = iter(range(3, 40))
        for key, value in d.items():
            if key.endswith(("_token_id", "_token_index", "_id")) and key != "vocab_size":
                if _is_int(value) and value >= vocab:
                    # (a pad_token_id's 0 is falsy, so it too takes a spare id)
                    o[key] = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}.get(key) or next(spare)
                elif isinstance(value, list) and value and all(_is_int(x) for x in value) and max(value) >= vocab:
                    o[key] = [2]
        if "pad_token_id" in d and d["pad_token_id"] is None:
            o["pad_token_id"] = 0

    # nested configs (text_config, vision_config, ...)
    for key, value in d.items():
        if isinstance(value, dict) and "model_type" in value:
            o[key] = {**value, **shrink(value)}
    return o


def build_config(
    config_class: type[PretrainedConfig], fit_stages: bool = False
) -> tuple[PretrainedConfig, dict[str, Any]]:
    """The tiny config of ``config_class`` and the overrides of its defaults that made it (``fit_stages``: with
    as many backbone layers as a dense head reads, :func:`_fit_backbone_stages`)."""
    defaults = config_class().to_dict()
    overrides = shrink(defaults)
    if fit_stages:
        _fit_backbone_stages(overrides, defaults)
    return config_class(**overrides), overrides


# --------------------------------------------------------------------------------------------------- batches


def _text_config(config: PretrainedConfig) -> PretrainedConfig:
    for attr in ("text_config", "decoder", "encoder"):
        sub = getattr(config, attr, None)
        if sub is not None and hasattr(sub, "vocab_size"):
            return sub
    return config


def candidate_batches(model: torch.nn.Module, config: PretrainedConfig, more: bool = False) -> list[Batch]:
    """Batches to try in order, chosen by ``model.main_input_name``; the first one a plain step runs on is used.
    With ``more`` (the heads of MORE_MAPPINGS), also each with the other inputs the forward takes: decoder ids for
    an encoder-decoder, text ids beside the images of a zero-shot tower, video clips and time series."""
    if not more:
        return _main_input_batches(model, config)
    try:
        batches = _main_input_batches(model, config)
    except RuntimeError:  # no recipe for the main input alone (videos, time series): the others below
        batches = []
    return batches + _with_other_inputs(model, config, batches)


def _image_size(config: PretrainedConfig) -> int:
    """The side of the images the (vision tower of the) model takes, 32 when its config names none."""
    vision = getattr(config, "vision_config", None) or config
    size = getattr(vision, "image_size", 32)
    return int(size[0] if isinstance(size, (list, tuple)) else (size or 32))


def _image_token(model: torch.nn.Module) -> int | None:
    """The id a vision-language model's text ids mark image positions with, None when it names none."""
    return next((getattr(model.config, k) for k in ("image_token_id", "image_token_index")
                 if _is_int(getattr(model.config, k, None))), None)


def multimodal_batches(model: torch.nn.Module, config: PretrainedConfig, image_tokens: int) -> list[Batch]:
    """A vision-language batch: one image at the vision tower's size (4-D, then 5-D for models that take images
    per sample) and text ids with ``image_tokens`` image tokens after two text tokens."""
    import torch

    g = torch.Generator().manual_seed(1)
    vc = getattr(config, "vision_config", None) or config
    size, channels = _image_size(config), getattr(vc, "num_channels", 3) or 3
    vocab = getattr(_text_config(config), "vocab_size", None) or VOCAB
    token = _image_token(model)
    ids = torch.randint(6 if vocab > 8 else 0, vocab, (1, 8 + image_tokens), generator=g)
    if _is_int(token) and token < vocab:
        ids[0, 2 : 2 + image_tokens] = token
    image = torch.randn(1, channels, size, size, generator=g)
    batches = [{"input_ids": ids, "pixel_values": image}, {"input_ids": ids, "pixel_values": image[:, None]}]
    try:
        accepted = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        accepted = {}
    if "image_sizes" in accepted:  # LLaVA-NeXT style: each image's (height, width), for its tiling
        sizes = torch.tensor([[size, size]])
        batches += [{**batch, "image_sizes": sizes} for batch in batches]
    if "image_grid_thw" in accepted:  # Qwen-VL style: flattened patches and their (time, height, width) grid
        patch = getattr(vc, "patch_size", 14) or 14
        temporal = getattr(vc, "temporal_patch_size", 2) or 2
        merge = getattr(vc, "spatial_merge_size", 2) or 2
        side = 2 * merge
        patches = torch.randn(side * side, channels * temporal * patch * patch, generator=g)
        batches.insert(0, {"input_ids": ids, "pixel_values": patches,
                           "image_grid_thw": torch.tensor([[1, side, side]])})
    return batches


def _retried_with_feature_count(model: torch.nn.Module, config: PretrainedConfig, batch: Batch,
                                error: str) -> list[Batch]:
    """The batches again with as many image tokens as the model's mismatch error says the image gives."""
    match = re.search(r"features:? (\d+)", error)
    if match is None:
        return []
    count = int(match.group(1))
    token = _image_token(model)
    present = int((batch["input_ids"] == token).sum()) if _is_int(token) else -1
    # some models count the elements of the image features, not the features: per token, the text width of them
    width = getattr(_text_config(config), "hidden_size", None)
    counts = [count] + ([count // width] if _is_int(width) and width > 1 and count % width == 0 else [])
    return [
        batch
        for tokens in dict.fromkeys(counts)
        if tokens != present and 0 < tokens <= 20000
        for batch in multimodal_batches(model, config, image_tokens=tokens)
    ]


def _with_other_inputs(model: torch.nn.Module, config: PretrainedConfig, batches: list[Batch]) -> list[Batch]:
    import torch

    g = torch.Generator().manual_seed(2)
    try:
        accepted = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return []
    name = getattr(model, "main_input_name", "input_ids")
    vocab = getattr(_text_config(config), "vocab_size", None) or getattr(config, "vocab_size", None) or VOCAB
    vocab = vocab if _is_int(vocab) else VOCAB
    extra: Batch = {}
    if "decoder_input_ids" in accepted:
        extra["decoder_input_ids"] = torch.randint(3 if vocab > 8 else 0, vocab, (2, 8), generator=g)
    if "input_ids" in accepted and name != "input_ids":
        extra["input_ids"] = torch.randint(3 if vocab > 8 else 0, vocab, TEXT_SHAPE, generator=g)
    if "pixel_values" in accepted and name != "pixel_values":
        size = _image_size(config)
        extra["pixel_values"] = torch.randn(2, 3, size, size, generator=g)
    out = [{**batch, **extra} for batch in batches[:3]] if extra else []
    frames = getattr(config, "num_frames", None) or getattr(getattr(config, "vision_config", None), "num_frames", None)
    if name in ("pixel_values", "pixel_values_videos"):
        size = _image_size(config)
        for count in ([frames] if _is_int(frames) else []) + [8, 16]:
            out.append({name: torch.randn(2, count, 3, size, size, generator=g)})
    if name == "past_values":  # time series: (batch, context, channels)
        context = getattr(config, "context_length", 32) or 32
        channels = getattr(config, "num_input_channels", 1) or 1
        out.append({name: torch.randn(2, context, channels, generator=g)})
    return out


def _main_input_batches(model: torch.nn.Module, config: PretrainedConfig) -> list[Batch]:
    import torch

    g = torch.Generator().manual_seed(1)
    name = getattr(model, "main_input_name", "input_ids")
    out: list[Batch] = []
    if name == "inputs" and "Image" in type(model).__name__:
        size = getattr(config, "image_size", 32) or 32
        out.append({name: torch.randn(2, 3, size, size, generator=g)})
    if name in ("input_ids", "inputs"):
        tc = _text_config(config)
        vocab = getattr(tc, "vocab_size", None) or getattr(config, "vocab_size", None) or VOCAB
        low = 3 if vocab > 8 else 0
        ids = torch.randint(low, vocab, TEXT_SHAPE, generator=g)
        eos = getattr(tc, "eos_token_id", None)
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        with_eos = ids.clone()
        if _is_int(eos) and eos < vocab:
            with_eos[:, -1] = eos
        out.append({name: with_eos})
        out.append({name: ids})
        if name == "inputs":
            out.append({name: torch.randn(2, 16, getattr(config, "d_model", H), generator=g)})
    if name == "pixel_values":
        vc = getattr(config, "vision_config", None) or config
        size = getattr(vc, "image_size", 32)
        size = size[0] if isinstance(size, (list, tuple)) else (size or 32)
        ch = getattr(vc, "num_channels", 3) or 3
        out.append({name: torch.randn(2, ch, size, size, generator=g)})
        out.append({name: torch.randn(2, 3, 64, 64, generator=g)})
        out.append({name: torch.randn(2, 3, 224, 224, generator=g)})
    if name == "input_values":
        out.append({name: torch.randn(2, AUDIO_SAMPLES, generator=g)})
        out.append({name: torch.randn(2, 1, AUDIO_SAMPLES, generator=g)})
        mel = getattr(config, "num_mel_bins", None)
        if mel:
            out.append({name: torch.randn(2, getattr(config, "max_length", 64), mel, generator=g)})
    if name == "input_features":
        feat = (getattr(config, "num_mel_bins", None) or getattr(config, "feature_size", None)
                or getattr(config, "input_feat_size", None) or 80)
        out.append({name: torch.randn(2, 64, feat, generator=g)})
        out.append({name: torch.randn(2, feat, 64, generator=g)})
        out.append({name: torch.randn(2, 200, feat, generator=g)})
        for feat2 in (80, 128, 160):
            if feat2 != feat:
                out.append({name: torch.randn(2, 64, feat2, generator=g)})
    if not out:
        raise RuntimeError(f"no batch recipe for main_input_name={name!r}")
    return out


# --------------------------------------------------------------------------------------------------- plain runs


def random_loss(output: Any, seed: int = 0, exclude: tuple[torch.Tensor, ...] | list[torch.Tensor] = ()) -> Any:
    """A random-direction loss over the output's float tensors that require grad, in pytree order (as diagnose's
    default loss sees them), ``exclude`` left out; None when there are none."""
    import torch
    from torch.utils._pytree import tree_leaves

    terms = [t for t in tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point()
             and t.requires_grad and all(t is not e for e in exclude)]
    gen = torch.Generator().manual_seed(seed)
    sums = [(t.float() * torch.randn(t.shape, generator=gen)).sum() for t in terms]
    if not sums:
        return None
    return sums[0] if len(sums) == 1 else torch.stack(sums).sum()


def plain_step(model: torch.nn.Module, batch: Batch) -> None:
    """One plain forward + backward with the random-direction loss; gradients cleared after."""
    loss = random_loss(model(**batch))
    if loss is None:
        raise RuntimeError("output holds no float tensor requiring grad")
    loss.backward()
    model.zero_grad(set_to_none=True)


def timed(fn: Callable[[], object], repeats: int = 3) -> float:
    """Best of ``repeats`` wall-clock seconds."""
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


class Timeout(Exception):
    pass


def _alarm(signum: int, frame: FrameType | None) -> NoReturn:
    raise Timeout("timed out")


def with_timeout(seconds: int, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, interrupted by :class:`Timeout` after ``seconds`` (SIGALRM: only while Python code runs)."""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(seconds)
    try:
        return fn(*args)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def gradient_profile(model: torch.nn.Module, batch: Batch, seed: int = 0) -> dict[str, Any]:
    """Plain-backward check: the RMS of the gradient reaching each Linear/Conv output (every call, in forward
    order) for the random-direction loss, plus the residual-stream gradients of ``hidden_states`` when the
    model returns them."""
    import torch
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, Conv1D)
    calls: list[dict[str, Any]] = []
    handles = []

    def hook(name: str) -> Callable[[nn.Module, Any, Any], None]:
        def fwd(module: nn.Module, args: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor) and output.requires_grad:
                row = {"name": name, "call": len(calls), "kind": type(module).__name__, "grad_rms": None,
                       "out_std": float(output.detach().float().std()) if output.numel() > 1 else 0.0}
                calls.append(row)

                def on_grad(grad: torch.Tensor, row: dict[str, Any] = row) -> None:
                    row["grad_rms"] = float(grad.detach().float().pow(2).mean().sqrt())

                output.register_hook(on_grad)

        return fwd

    for name, module in model.named_modules():
        if isinstance(module, kinds):
            handles.append(module.register_forward_hook(hook(name)))
    torch.manual_seed(seed)
    stream = None
    try:
        try:
            out = model(**batch, output_hidden_states=True)
        except TypeError:
            out = model(**batch)
        hidden = getattr(out, "hidden_states", None) if not isinstance(out, dict) or "hidden_states" in out else None
        if hidden is None and isinstance(out, dict):
            hidden = out.get("encoder_hidden_states")
        hidden = [h for h in (hidden or ()) if isinstance(h, torch.Tensor) and h.requires_grad]
        for h in hidden:
            h.retain_grad()
        loss = random_loss(out, seed, exclude=hidden)
        loss.backward()
        if hidden:
            stream = [float(h.grad.float().pow(2).mean().sqrt()) if h.grad is not None else None for h in hidden]
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
    # like diagnose, leave out query/key projections (near-uniform softmax: small delta by construction) and
    # routers/gates
    skip = re.compile(r"(^|\.)(q_proj|k_proj|query|key|q|k|router|gate|gate_proj_router|wq|wk)$")
    with_grad = [c for c in calls if c["grad_rms"] and not skip.search(c["name"])]
    summary: dict[str, Any] = {"layers": calls, "stream": stream}
    if len(with_grad) >= 3:
        first, last_hidden, head = with_grad[0], with_grad[-2], with_grad[-1]
        hidden_rms = [c["grad_rms"] for c in with_grad[:-1]]
        summary.update(first=first["name"], last_hidden=last_hidden["name"], head=head["name"],
                       first_over_last_hidden=first["grad_rms"] / last_hidden["grad_rms"],
                       min_over_max=min(hidden_rms) / max(hidden_rms))
    if stream and len(stream) >= 3 and stream[0] and stream[-2]:
        # hidden_states[-1] is often after the final norm: compare the embedding output with the last block's
        # pre-norm output (hidden_states[-2])
        summary["stream_first_over_last"] = stream[0] / stream[-2]
    # like-for-like: the same role (name with its numbers removed) in the first and the last block
    roles: dict[str, list[float]] = {}
    for c in with_grad[:-1]:
        roles.setdefault(re.sub(r"\.\d+\.", ".#.", c["name"]), []).append(c["grad_rms"])
    role_ratios = {r: v[0] / v[-1] for r, v in roles.items() if len(v) >= 2 and v[-1]}
    if role_ratios:
        values = sorted(role_ratios.values())
        summary["role_ratio_median"] = values[len(values) // 2]
        summary["role_ratio_min"], summary["role_ratio_max"] = values[0], values[-1]
        summary["role_ratios"] = dict(sorted(role_ratios.items(), key=lambda kv: kv[1])[:6])
    summary["zero_grad_layers"] = [c["name"] for c in calls if c["grad_rms"] == 0.0][:20]
    summary["no_grad_layers"] = len([c for c in calls if c["grad_rms"] is None])
    return summary


# --------------------------------------------------------------------------------------------------- one model


def _build(model_type: str, class_name: str, mapping: str) -> tuple[torch.nn.Module, PretrainedConfig, dict]:
    import transformers
    from transformers import CONFIG_MAPPING

    model_class = getattr(transformers, class_name)
    config, overrides = build_config(CONFIG_MAPPING[model_type], fit_stages=mapping in MORE_NAMES)
    backbone = getattr(config, "backbone_config", None)
    if mapping in MORE_NAMES and getattr(backbone, "model_type", None) == "timm_backbone":
        # DETR-style detectors default to a timm backbone, and timm imports torchvision: the library's own ResNet,
        # one block per stage, with the stages the timm backbone handed on
        indices = list(getattr(backbone, "out_indices", None) or [1, 2, 3, 4])
        overrides["backbone_config"] = transformers.ResNetConfig(
            depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 64, 64], embedding_size=16, out_indices=indices
        )
        config = CONFIG_MAPPING[model_type](**overrides)
        overrides["backbone_config"] = "ResNetConfig(depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 64, 64])"
    if hasattr(config, "use_cache"):
        config.use_cache = False
    if mapping == "CAUSAL_LM" and hasattr(config, "is_decoder"):
        config.is_decoder = True  # BERT-style encoders used as causal LMs (Reformer asserts it)
    model = model_class(config)
    if mapping in MULTIMODAL_NAMES:
        vocab = getattr(_text_config(config), "vocab_size", None) or VOCAB
        for key in ("image_token_id", "image_token_index"):
            if _is_int(getattr(model.config, key, None)) and getattr(model.config, key) >= vocab:
                setattr(model.config, key, IMAGE_TOKEN)
    if hasattr(model, "set_default_language"):
        model.set_default_language(next(iter(getattr(config, "languages", ["en_XX"]))))
    model.train()
    return model, config, overrides


def _fit_backbone_stages(overrides: dict[str, Any], defaults: dict[str, Any]) -> bool:
    """Keep as many layers as the stages a dense head reads (Depth Anything, ZoeDepth, RF-DETR read 4 of a ViT's
    12 or 24 layers: the tiny config's 2 layers leave those stages out), and a neck as wide as its backbone.
    Returns whether it changed anything."""
    changed = False
    nested = overrides.get("backbone_config")
    if isinstance(nested, dict) and _is_int(nested.get("num_hidden_layers")):
        stages = nested.get("out_indices") or [
            int(name[5:]) for name in nested.get("out_features") or [] if name[5:].isdigit()
        ]
        if stages and max(stages) > nested["num_hidden_layers"]:
            count = len(stages)
            nested.update(num_hidden_layers=count, out_indices=list(range(1, count + 1)),
                          out_features=[f"stage{i}" for i in range(1, count + 1)])
            nested.pop("stage_names", None)
            changed = True
        if _is_int(defaults.get("reassemble_hidden_size")) and _is_int(nested.get("hidden_size")):
            overrides["reassemble_hidden_size"] = nested["hidden_size"]  # the neck reads the backbone's width
            changed = True
    indices = overrides.get("backbone_out_indices")
    layers = overrides.get("num_hidden_layers")
    if isinstance(indices, list) and _is_int(layers) and max(indices, default=0) >= layers:
        overrides.update(num_hidden_layers=len(indices), backbone_out_indices=list(range(len(indices))))
        changed = True
    return changed


def run_one(model_type: str, class_name: str, mapping: str) -> dict[str, Any]:
    """Build one model, find a batch, time a plain step and diagnose(), profile its gradients: the JSON record."""
    import torch

    from lightning_gradstab.diagnosis import diagnose

    rec: dict[str, Any] = {"type": model_type, "class": class_name, "mapping": mapping, "status": None}
    t_start = time.perf_counter()
    torch.manual_seed(0)
    # ---- build
    try:
        model, config, overrides = with_timeout(BUILD_TIMEOUT, _build, model_type, class_name, mapping)
        rec["overrides"] = {k: (v if not isinstance(v, dict) else "{...}") for k, v in overrides.items()}
        rec["params"] = sum(p.numel() for p in model.parameters())
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            raise
        rec.update(status="could not build", stage="build", error=f"{type(e).__name__}: {e}"[:400])
        return rec
    # ---- plain forward + backward on the first batch that runs
    batch, errors = None, []
    try:
        if mapping in MULTIMODAL_NAMES:
            queue = multimodal_batches(model, config, image_tokens=1)
        else:
            queue = candidate_batches(model, config, more=mapping in MORE_NAMES)
        tried = 0
        while queue and tried < 8:
            cand = queue.pop(0)
            tried += 1
            try:
                torch.manual_seed(0)
                with_timeout(BUILD_TIMEOUT, plain_step, model, cand)
                batch = cand
                break
            except Timeout:
                errors.append("plain forward/backward timed out")
                break
            except Exception as e:
                errors.append(f"{type(e).__name__}: {e}"[:300])
                if mapping in MULTIMODAL_NAMES:
                    queue[:0] = _retried_with_feature_count(model, config, cand, str(e))
    except Exception as e:
        errors.append(f"{type(e).__name__}: {e}"[:300])
    if batch is None:
        rec.update(status="could not build", stage="plain forward/backward", error=" | ".join(errors)[:600])
        return rec
    rec["batch"] = {k: list(v.shape) for k, v in batch.items()}
    rec["plain_s"] = timed(lambda: plain_step(model, batch))
    # ---- diagnose
    try:
        t0 = time.perf_counter()
        report = with_timeout(DIAGNOSE_TIMEOUT, diagnose, model, batch)
        times = [time.perf_counter() - t0]
        if times[0] < 5.0:
            for _ in range(2):
                t0 = time.perf_counter()
                diagnose(model, batch)
                times.append(time.perf_counter() - t0)
        rec["diagnose_s"] = min(times)
        rec["diagnose_runs"] = len(times)
        rec["cost_ratio"] = rec["diagnose_s"] / rec["plain_s"] if rec["plain_s"] > 0 else None
        rec["findings"] = [f.to_dict() for f in report.findings]
        rec["status"] = "ok"
    except Timeout:
        rec.update(status="diagnose timeout", error=f"diagnose did not finish in {DIAGNOSE_TIMEOUT} s")
    except Exception as e:
        rec.update(status="diagnose exception", error=f"{type(e).__name__}: {e}"[:1000],
                   traceback=traceback.format_exc()[-4000:])
    # ---- plain-backward gradient profile (the check for suspicious findings; cheap, so for every model)
    try:
        rec["profile"] = with_timeout(DIAGNOSE_TIMEOUT, gradient_profile, model, batch)
        rec["profile"]["layers"] = rec["profile"]["layers"][:400]
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            raise
        rec["profile_error"] = f"{type(e).__name__}: {e}"[:300]
    rec["total_s"] = time.perf_counter() - t_start
    return rec


# --------------------------------------------------------------------------------------------------- processes


def _append(out: Path, rec: dict[str, Any]) -> None:
    with out.open("a") as fh:
        fh.write(json.dumps(rec, default=str) + "\n")


def _records(out: Path) -> list[dict[str, Any]]:
    if not out.exists():
        return []
    with out.open() as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _current(out: Path) -> Path:
    """The worker's marker file: the model type it is on and when it started it."""
    return Path(f"{out}.current")


def worker(out: Path, cands: list[Candidate]) -> None:
    """Run the models one by one in this process, appending one JSON line each to ``out``."""
    import warnings

    import torch
    import transformers

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    for model_type, class_name, mapping in cands:
        _current(out).write_text(f"{model_type}|{time.time()}")
        _append(out, run_one(model_type, class_name, mapping))
        gc.collect()
    _current(out).unlink()


def _failure(cand: Candidate, status: str, error: str) -> dict[str, Any]:
    return {"type": cand[0], "class": cand[1], "mapping": cand[2], "status": status, "error": error}


def driver(out: Path, cands: list[Candidate], budget: float) -> None:
    """Run worker processes until every candidate has a line in ``out`` or ``budget`` seconds have passed; a worker
    stuck on one model for HARD_TIMEOUT seconds is killed (that model: "hard timeout"), and one that dies records
    the model it was on as "worker crash"."""
    out.parent.mkdir(parents=True, exist_ok=True)
    current, log_path = _current(out), Path(f"{out}.log")
    try:
        _drive(out, cands, budget, current, log_path)
    finally:  # no marker left behind, and no log unless a worker wrote to it
        current.unlink(missing_ok=True)
        if log_path.exists() and not log_path.stat().st_size:
            log_path.unlink()


def _drive(out: Path, cands: list[Candidate], budget: float, current: Path, log_path: Path) -> None:
    done = {r["type"] for r in _records(out)}
    todo = [c for c in cands if c[0] not in done]
    t0 = time.time()
    while todo and time.time() - t0 < budget:
        current.unlink(missing_ok=True)  # a marker left by an interrupted run would read as a hung model
        with log_path.open("a") as log:
            proc = subprocess.Popen([sys.executable, __file__, "worker", str(out), *("|".join(c) for c in todo)],
                                    cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            while proc.poll() is None:
                time.sleep(2)
                if current.exists():
                    try:
                        model_type, started = current.read_text().split("|")
                        if time.time() - float(started) > HARD_TIMEOUT:
                            proc.kill()
                            proc.wait()
                            cand = next(c for c in todo if c[0] == model_type)
                            _append(out, _failure(cand, "hard timeout", f"worker killed after {HARD_TIMEOUT} s"))
                    except (ValueError, OSError):
                        pass
                if time.time() - t0 > budget:
                    proc.kill()
                    proc.wait()
                    print("budget exhausted", flush=True)
                    return
        done = {r["type"] for r in _records(out)}
        remaining = [c for c in todo if c[0] not in done]
        if proc.returncode and remaining:
            # died (e.g. a segfault): the model it was on, or the first one if it wrote nothing, is the crash
            crashed = current.read_text().split("|")[0] if current.exists() else None
            if remaining == todo:
                crashed = remaining[0][0]
            if crashed in {c[0] for c in remaining}:
                cand = next(c for c in remaining if c[0] == crashed)
                _append(out, _failure(cand, "worker crash", f"exit code {proc.returncode}"))
                remaining.remove(cand)
        todo = remaining
        print(f"{len(done)} done, {len(todo)} to do, {time.time() - t0:.0f} s", flush=True)


# --------------------------------------------------------------------------------------------------- summary


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _finding(f: dict[str, Any]) -> str:
    mods = list(f["modules"])
    shown = ", ".join(mods[:3]) + (f", +{len(mods) - 3} more" if len(mods) > 3 else "")
    return f"{f['severity']} `{f['code']}` ({shown})"


def write_summary(out: Path, command: str, n_candidates: int | None = None) -> Path:
    """Write the Markdown summary of the results file ``out`` next to it (same stem, ``.md``); return its path."""
    rs = _records(out)
    ok = [r for r in rs if r["status"] == "ok"]
    failed = [r for r in rs if r["status"] in DIAGNOSE_FAILURES]
    unbuilt = [r for r in rs if r["status"] == "could not build"]
    statuses = collections.Counter(r["status"] for r in rs)
    count = collections.Counter((f["severity"], f["code"]) for r in ok for f in r["findings"])
    models_with = collections.Counter(key for r in ok for key in {(f["severity"], f["code"]) for f in r["findings"]})
    flagged = [r for r in ok if any(f["severity"] == "error" or (f["severity"] == "warning"
                                                                  and f["code"] in SUSPICIOUS_WARNINGS)
                                    for f in r["findings"])]
    ratios = [r for r in ok if r.get("cost_ratio") is not None]

    w: list[str] = []
    w.append("# diagnose() on Hugging Face `transformers` architectures at random init\n")
    w.append(f"* Command: `{command}`")
    w.append(f"* Results: `{out.name}` (one JSON line per model)")
    w.append(f"* Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    w.append(f"* Machine: {cpu_name()}, {os.cpu_count()} cores (one thread per worker); Python "
             f"{platform.python_version()}, torch {metadata.version('torch')}, transformers "
             f"{metadata.version('transformers')}\n")

    w.append("## Counts\n")
    total = n_candidates if n_candidates is not None else len(rs)
    w.append(f"* Candidates: {total}" + (f" ({total - len(rs)} without a result)" if total != len(rs) else ""))
    built = len(ok) + statuses["diagnose exception"] + statuses["diagnose timeout"]
    w.append(f"* Built (a plain forward + backward ran): {built}; diagnosed without exception: {len(ok)}")
    w.append(f"* Could not build (the tiny config, the constructor or the plain step failed, before diagnose): "
             f"{len(unbuilt)}")
    w.append(f"* diagnose exceptions: {statuses['diagnose exception']}, diagnose timeouts "
             f"({DIAGNOSE_TIMEOUT} s): {statuses['diagnose timeout']}, worker killed (hung past {HARD_TIMEOUT} s): "
             f"{statuses['hard timeout']}, worker crashes: {statuses['worker crash']}")
    if ratios:
        top = max(ratios, key=lambda r: r["cost_ratio"])
        w.append(f"* diagnose() cost (diagnose / plain forward + backward, best of 3 each): median "
                 f"{statistics.median(r['cost_ratio'] for r in ratios):.2f}, max {top['cost_ratio']:.2f} "
                 f"({top['type']})")
    w.append("")

    w.append("## Findings\n")
    w.append("| severity | code | findings | models |")
    w.append("|---|---|---:|---:|")
    order = {"error": 0, "warning": 1, "info": 2}
    for (sev, code), n in sorted(count.items(), key=lambda kv: (order.get(kv[0][0], 3), -kv[1], kv[0][1])):
        w.append(f"| {sev} | `{code}` | {n} | {models_with[(sev, code)]} |")
    w.append("")

    w.append(f"## Models with an error, or a warning {', '.join(sorted(SUSPICIOUS_WARNINGS))}: {len(flagged)}\n")
    if flagged:
        w.append("All findings of each model (at most 3 modules shown).\n")
        w.append("| model type | class | findings |")
        w.append("|---|---|---|")
        for r in sorted(flagged, key=lambda r: r["type"]):
            w.append(f"| {r['type']} | {r['class']} | {'<br>'.join(_cell(_finding(f)) for f in r['findings'])} |")
        w.append("")

    if failed:
        w.append(f"## diagnose exceptions, timeouts and crashes: {len(failed)}\n")
        w.append("| model type | class | status | error |")
        w.append("|---|---|---|---|")
        for r in sorted(failed, key=lambda r: r["type"]):
            w.append(f"| {r['type']} | {r['class']} | {r['status']} | {_cell((r.get('error') or '')[:200])} |")
        w.append("")

    path = out.with_suffix(".md")
    path.write_text("\n".join(w))
    return path


# --------------------------------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    listing = sub.add_parser("list", help="print the candidates, one type|class|mapping a line")
    run = sub.add_parser("run", help="run the sweep (resuming OUT), then write the summary")
    for command_parser in (listing, run):
        command_parser.add_argument(
            "--mappings", choices=("core", "more", "multimodal"), default="core",
            help="core: the six mappings of MAPPINGS; more: the model types only MORE_MAPPINGS holds (detection, "
            f"segmentation, depth, video, encoder-decoders, speech-to-text, ...; default results file {MORE_OUT}); "
            f"multimodal: the vision-language models of the image-text-to-text mapping ({MULTIMODAL_OUT})",
        )
    run.add_argument("--out", type=Path, default=None, help=f"results file (default {DEFAULT_OUT})")
    run.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="wall-clock seconds for the sweep")
    run.add_argument("--only", help="comma-separated model types (as in CONFIG_MAPPING; zoo types allowed)")
    summary = sub.add_parser("summary", help="write OUT's Markdown summary (same stem, .md)")
    summary.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results file (default {DEFAULT_OUT})")
    work = sub.add_parser("worker", help="(internal) run these models in one process")
    work.add_argument("out", type=Path)
    work.add_argument("specs", nargs="+", help="type|class|mapping")
    args = parser.parse_args(argv)
    command = shlex.join(["python", *sys.argv])

    if args.command == "list":
        for cand in candidates(more=args.mappings == "more", multimodal=args.mappings == "multimodal"):
            print("|".join(cand))
    elif args.command == "worker":
        worker(args.out, [tuple(spec.split("|")) for spec in args.specs])
    elif args.command == "summary":
        print("wrote", write_summary(args.out, command))
    else:
        more, multimodal = args.mappings == "more", args.mappings == "multimodal"
        args.out = args.out or (MORE_OUT if more else MULTIMODAL_OUT if multimodal else DEFAULT_OUT)
        only = args.only.split(",") if args.only else None
        cands = candidates(include_zoo=bool(only), more=more, multimodal=multimodal)
        if only:
            missing = sorted(set(only) - {c[0] for c in cands})
            if missing:
                print(f"not candidates (not in the auto mappings, or skipped): {', '.join(missing)}", file=sys.stderr)
            cands = [c for c in cands if c[0] in only]
        driver(args.out, cands, args.budget)
        print("wrote", write_summary(args.out, command, len(cands)))


if __name__ == "__main__":
    main()
