"""Robustness sweep of ``diagnose()`` on the model classes of ``diffusers`` at random init.

Diffusion models start in ways no classifier does: output convolutions and adaLN modulations initialised to zero
(DiT's adaLN-Zero, ControlNet's zero convolutions), GroupNorm everywhere, timestep and text conditioning entering
through separate embeddings. Eleven classes, each at a small config of its constructor's arguments (widths 16-64,
1-2 layers per block; none is in the test zoo or any test, and no rule was written with them at hand), run once
plainly and then through ``diagnose(model, batch)`` on a batch of 2. One JSON line per model goes to the results
file (parameters, layers traced and measured, seconds, findings), and a Markdown summary next to it.

Install diffusers without its dependencies, and ``requests``, which it imports (``pip install requests && pip
install --no-deps diffusers``; the rest comes with ``transformers``):

    OMP_NUM_THREADS=1 python scripts/diffusers_sweep.py [--out FILE.jsonl]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from sweep_records import cpu_name, diagnose_into  # scripts/sweep_records.py: run as python scripts/<name>.py
from torch.utils._pytree import tree_leaves

DEFAULT_OUT = Path("benchmarks/results/diffusers-sweep.jsonl")


def _randn(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def models() -> dict[str, Callable[[], tuple[torch.nn.Module, dict[str, Any]]]]:
    """Model name -> a function returning ``(model, keyword batch)``: small configs, batches of 2."""
    import diffusers as d

    steps = torch.tensor([10, 500])
    text = _randn(2, 8, 32, seed=2)  # encoder hidden states: 8 tokens of width 32
    unet = {"layers_per_block": 1, "block_out_channels": (32, 64), "norm_num_groups": 8}
    autoencoder = {
        "in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",) * 2,
        "up_block_types": ("UpDecoderBlock2D",) * 2, "latent_channels": 4, **unet,
    }
    cross = {"cross_attention_dim": 32, "attention_head_dim": 8}
    dit = {"num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 2}
    return {
        "UNet2DModel (DDPM)": lambda: (
            d.UNet2DModel(sample_size=32, in_channels=3, out_channels=3, down_block_types=("DownBlock2D",
                          "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"), **unet),
            {"sample": _randn(2, 3, 32, 32), "timestep": steps},
        ),
        "UNet2DConditionModel (Stable Diffusion)": lambda: (
            d.UNet2DConditionModel(sample_size=32, in_channels=4, out_channels=4, down_block_types=(
                "CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                **cross, **unet),
            {"sample": _randn(2, 4, 32, 32), "timestep": steps, "encoder_hidden_states": text},
        ),
        "ControlNetModel": lambda: (
            d.ControlNetModel(in_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                              conditioning_embedding_out_channels=(16, 32), **cross, **unet),
            {"sample": _randn(2, 4, 32, 32), "timestep": steps, "encoder_hidden_states": text,
             "controlnet_cond": _randn(2, 3, 64, 64, seed=4)},
        ),
        "AutoencoderKL (SD VAE)": lambda: (d.AutoencoderKL(**autoencoder), {"sample": _randn(2, 3, 32, 32)}),
        "VQModel (VQ-GAN)": lambda: (
            d.VQModel(num_vq_embeddings=64, **autoencoder), {"sample": _randn(2, 3, 32, 32)},
        ),
        "DiTTransformer2DModel (DiT, adaLN-Zero)": lambda: (
            d.DiTTransformer2DModel(in_channels=4, out_channels=4, sample_size=16, patch_size=2,
                                    num_embeds_ada_norm=10, **dit),
            {"hidden_states": _randn(2, 4, 16, 16), "timestep": torch.tensor([1, 5]),
             "class_labels": torch.tensor([1, 3])},
        ),
        "PixArtTransformer2DModel": lambda: (
            d.PixArtTransformer2DModel(in_channels=4, out_channels=8, sample_size=16, patch_size=2,
                                       cross_attention_dim=32, caption_channels=32, **dit),
            {"hidden_states": _randn(2, 4, 16, 16), "timestep": steps, "encoder_hidden_states": text,
             "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}},
        ),
        "SD3Transformer2DModel (MMDiT)": lambda: (
            d.SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
                                    num_attention_heads=2, caption_projection_dim=32, joint_attention_dim=32,
                                    pooled_projection_dim=16, out_channels=4),
            {"hidden_states": _randn(2, 4, 16, 16), "encoder_hidden_states": text,
             "pooled_projections": _randn(2, 16, seed=3), "timestep": steps},
        ),
        "FluxTransformer2DModel": lambda: (
            d.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                     attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                     pooled_projection_dim=16, axes_dims_rope=(4, 6, 6)),
            {"hidden_states": _randn(2, 64, 16), "encoder_hidden_states": text,
             "pooled_projections": _randn(2, 16, seed=3), "timestep": torch.tensor([0.1, 0.5]),
             "img_ids": torch.zeros(64, 3), "txt_ids": torch.zeros(8, 3)},
        ),
        "Transformer2DModel (latent, continuous input)": lambda: (
            d.Transformer2DModel(in_channels=32, norm_num_groups=8, **dit), {"hidden_states": _randn(2, 32, 8, 8)},
        ),
        "UVit2DModel (aMUSEd)": lambda: (
            d.UVit2DModel(hidden_size=32, use_bias=False, hidden_dropout=0.0, cond_embed_dim=16,
                          micro_cond_encode_dim=2, micro_cond_embed_dim=10, encoder_hidden_size=16, vocab_size=32,
                          codebook_size=32, in_channels=16, block_out_channels=16, num_res_blocks=1,
                          downsample=True, upsample=True, block_num_heads=1, num_hidden_layers=2,
                          num_attention_heads=1, attention_dropout=0.0, intermediate_size=32, layer_norm_eps=1e-06,
                          ln_elementwise_affine=True),
            {"input_ids": torch.randint(0, 32, (2, 8, 8), generator=torch.Generator().manual_seed(5)),
             "encoder_hidden_states": _randn(2, 8, 16, seed=2), "pooled_text_emb": _randn(2, 16, seed=3),
             "micro_conds": _randn(2, 5, seed=6)},
        ),
    }


def run_one(name: str, build: Callable[[], tuple[torch.nn.Module, dict[str, Any]]]) -> dict[str, Any]:
    row: dict[str, Any] = {"model": name}
    try:
        torch.manual_seed(0)
        model, batch = build()
        model.train()
        outputs = [t for t in tree_leaves(model(**batch)) if isinstance(t, torch.Tensor) and t.requires_grad]
        sum(t.float().sum() for t in outputs).backward()  # a model that cannot run plainly is no finding
        model.zero_grad(set_to_none=True)
        row["parameters"] = sum(p.numel() for p in model.parameters())
    except Exception as error:
        row["build_error"] = f"{type(error).__name__}: {error}"[:300]
        return row
    report = diagnose_into(row, model, batch)
    if report is not None:
        row["layers"] = len(report.layers)
        row["measured"] = sum(1 for layer in report.layers if layer.get("grad_rms") is not None)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    import diffusers

    torch.set_num_threads(1)
    rows = []
    for name, build in models().items():
        rows.append(run_one(name, build))
        print(name, rows[-1].get("build_error") or rows[-1].get("exception") or
              [(f["severity"], f["code"]) for f in rows[-1]["findings"]], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    lines = [
        "# diagnose() on diffusers' model classes at random init",
        "",
        f"* Command: `{shlex.join(['python', *sys.argv])}`",
        f"* Results: `{args.out.name}` (one JSON line per model)",
        f"* Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"* Machine: {cpu_name()}, one thread; Python {platform.python_version()}, torch {torch.__version__}, "
        f"diffusers {diffusers.__version__}",
        "",
        "| model | parameters | layers traced (delta measured) | findings | diagnose s |",
        "|---|---:|---|---|---:|",
    ]
    for row in rows:
        if "findings" in row:
            findings = "<br>".join(f"{f['severity']} `{f['code']}` ({', '.join(f['modules'][:3])})"
                                   for f in row["findings"]) or "-"
            lines.append(f"| {row['model']} | {row['parameters']:,} | {row['layers']} ({row['measured']}) | "
                         f"{findings} | {row['diagnose_s']:.3f} |")
        else:
            lines.append(f"| {row['model']} | - | - | {row.get('build_error') or row.get('exception')} | - |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
