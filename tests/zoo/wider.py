"""The wider zoo of diagnosis v3: architectures in styles the first zoo does not cover.

- :data:`STOCK_WIDER`: speech encoders, mixture-of-experts, multimodal towers, state-space models, softcapped
  and LayerScale models, averaged heads and losses computed in ``forward``, from ``transformers`` config classes
  at the library's own init (reduced sizes), plus torchvision-style BatchNorm ResNets written with torchvision's
  init loop. Every one must get no error-level finding.
- :data:`GOOD_WIDER`: the literature's deliberate inits (Fixup, ReZero, SkipInit, DeepNet, SELU with LeCun init,
  orthogonal deep tanh, a muP readout, LayerScale as a module): nothing above info.

The broken models written in the styles where depth is applications of weights are in
:mod:`tests.zoo.applied`.
"""

from __future__ import annotations

import math

import torch
import transformers as hf
from torch import Tensor, nn
from torch.nn import functional as F

from tests.zoo.entry import ZooEntry, generator, image_batch, token_batch

VOCAB = 128
SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}
TEXT = "2 layers, width 64, 4 heads, vocab 128, batch 4 x 16 tokens"
IMAGE = "32x32 images, batch 4"
AUDIO = "2 layers, width 32, 2 conv layers, 1600 samples, batch 2"


def _audio_batch(samples: int = 1600, batch: int = 2) -> dict[str, Tensor]:
    return {"input_values": torch.randn(batch, samples, generator=generator())}


def _speech_config(config_class: type, **extra: object) -> object:
    return config_class(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                        num_conv_pos_embedding_groups=2, vocab_size=32, **extra)


def wav2vec2() -> tuple[nn.Module, dict]:
    # the feature encoder sets requires_grad on a view of the input (the probe must not)
    return hf.Wav2Vec2ForCTC(_speech_config(hf.Wav2Vec2Config)), _audio_batch()


def wav2vec2_with_labels() -> tuple[nn.Module, dict]:
    # CTC loss computed in forward from the labels
    labels = torch.randint(1, 32, (2, 4), generator=generator(2))
    return hf.Wav2Vec2ForCTC(_speech_config(hf.Wav2Vec2Config)), {**_audio_batch(), "labels": labels}


def hubert() -> tuple[nn.Module, dict]:
    return hf.HubertForCTC(_speech_config(hf.HubertConfig)), _audio_batch()


def wavlm() -> tuple[nn.Module, dict]:
    return hf.WavLMForCTC(_speech_config(hf.WavLMConfig, num_buckets=32, max_bucket_distance=64)), _audio_batch()


def data2vec_audio() -> tuple[nn.Module, dict]:
    return hf.Data2VecAudioForCTC(_speech_config(hf.Data2VecAudioConfig, conv_pos_kernel_size=5)), _audio_batch()


def whisper() -> tuple[nn.Module, dict]:
    config = hf.WhisperConfig(vocab_size=VOCAB, num_mel_bins=16, d_model=64, encoder_layers=2, decoder_layers=2,
                              encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                              decoder_ffn_dim=128, max_source_positions=16, max_target_positions=16,
                              decoder_start_token_id=1, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    features = torch.randn(2, 16, 32, generator=generator())
    decoder_ids = torch.randint(3, VOCAB, (2, 8), generator=generator(2))
    return hf.WhisperForConditionalGeneration(config), {"input_features": features, "decoder_input_ids": decoder_ids}


def audio_spectrogram_transformer() -> tuple[nn.Module, dict]:
    config = hf.ASTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                          patch_size=8, frequency_stride=8, time_stride=8, max_length=32, num_mel_bins=32,
                          num_labels=10)
    return hf.ASTForAudioClassification(config), {"input_values": torch.randn(2, 32, 32, generator=generator())}


def _causal(config_class: type, model_class: type, **kwargs: object) -> tuple[nn.Module, dict]:
    config = config_class(vocab_size=VOCAB, max_position_embeddings=64, **{**SMALL, **kwargs})
    return model_class(config), token_batch(VOCAB)


def mixtral() -> tuple[nn.Module, dict]:
    return _causal(hf.MixtralConfig, hf.MixtralForCausalLM, num_key_value_heads=2, num_local_experts=4,
                   num_experts_per_tok=2)


def qwen2_moe() -> tuple[nn.Module, dict]:
    return _causal(hf.Qwen2MoeConfig, hf.Qwen2MoeForCausalLM, num_key_value_heads=2, num_experts=4,
                   num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=64)


def olmoe() -> tuple[nn.Module, dict]:
    return _causal(hf.OlmoeConfig, hf.OlmoeForCausalLM, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2)


def gemma2() -> tuple[nn.Module, dict]:
    # final-logit softcap 30 * tanh(x / 30) and attention-logit softcap 50
    return _causal(hf.Gemma2Config, hf.Gemma2ForCausalLM, num_key_value_heads=2, head_dim=16, sliding_window=8)


def qwen3() -> tuple[nn.Module, dict]:
    return _causal(hf.Qwen3Config, hf.Qwen3ForCausalLM, num_key_value_heads=2, head_dim=16)


def olmo2() -> tuple[nn.Module, dict]:
    return _causal(hf.Olmo2Config, hf.Olmo2ForCausalLM, num_key_value_heads=2)


def zaya() -> tuple[nn.Module, dict]:
    # the residual add is a module with per-feature gains on both paths; its QK-norm temperature starts at 0
    return _causal(hf.ZayaConfig, hf.ZayaForCausalLM, num_key_value_heads=2, head_dim=16, moe_intermediate_size=64,
                   num_experts=4, layer_types=["hybrid", "hybrid"])


def ergo() -> tuple[nn.Module, dict]:
    # the residual add is a learned gate module: sigmoid(w) * branch + sqrt(1 + sigmoid(w)) exp(-softplus(w) / 2) * x
    return _causal(hf.ErgoConfig, hf.ErgoForCausalLM, num_key_value_heads=2, moe_intermediate_size=64, num_experts=4,
                   first_dense_intermediate_size=128, shared_intermediate_size=64,
                   num_experts_per_tok=2, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                   mlp_layer_types=["dense", "sparse"])


def mamba() -> tuple[nn.Module, dict]:
    config = hf.MambaConfig(vocab_size=VOCAB, hidden_size=64, state_size=8, num_hidden_layers=2, expand=2,
                            conv_kernel=4, use_mambapy=True)
    return hf.MambaForCausalLM(config), token_batch(VOCAB)


def modernbert() -> tuple[nn.Module, dict]:
    config = hf.ModernBertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=128, max_position_embeddings=64, global_attn_every_n_layers=2,
                                 local_attention=8, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
                                 sep_token_id=2)
    return hf.ModernBertForMaskedLM(config), token_batch(VOCAB)


def bert_sequence_classification_with_labels() -> tuple[nn.Module, dict]:
    # cross-entropy computed in forward from the labels; the classifier reads the [CLS] token through the pooler
    config = hf.BertConfig(vocab_size=VOCAB, max_position_embeddings=32, num_labels=3, **SMALL)
    labels = torch.randint(0, 3, (4,), generator=generator(2))
    return hf.BertForSequenceClassification(config), token_batch(VOCAB, labels=labels,
                                                                  attention_mask=torch.ones(4, 16, dtype=torch.long))


def clip() -> tuple[nn.Module, dict]:
    # two towers (text and vision) joined by a contrastive logit scale
    config = hf.CLIPConfig(text_config={"vocab_size": VOCAB, **SMALL, "max_position_embeddings": 32},
                           vision_config={**SMALL, "image_size": 32, "patch_size": 8}, projection_dim=32)
    return hf.CLIPModel(config), {**token_batch(VOCAB), "pixel_values": image_batch()}


def siglip_vision() -> tuple[nn.Module, dict]:
    # attention-pooling head (a learned probe query) over the patch tokens
    config = hf.SiglipVisionConfig(**SMALL, image_size=32, patch_size=8)
    return hf.SiglipVisionModel(config), {"pixel_values": image_batch()}


def deit_with_teacher() -> tuple[nn.Module, dict]:
    # the class-token head and the distillation head averaged: (cls + distill) / 2
    config = hf.DeiTConfig(**SMALL, image_size=32, patch_size=8, num_labels=10)
    return hf.DeiTForImageClassificationWithTeacher(config), {"pixel_values": image_batch()}


def swinv2() -> tuple[nn.Module, dict]:
    # continuous position bias: an MLP over constant coordinates, then 16 * sigmoid
    config = hf.Swinv2Config(image_size=32, patch_size=2, embed_dim=32, depths=[2, 2], num_heads=[2, 4],
                             window_size=4, num_labels=10)
    return hf.Swinv2ForImageClassification(config), {"pixel_values": image_batch()}


def dinov2_registers() -> tuple[nn.Module, dict]:
    # LayerScale as a module (Dinov2WithRegistersLayerScale, 1.0 here) and register tokens
    config = hf.Dinov2WithRegistersConfig(**{k: v for k, v in SMALL.items() if k != "intermediate_size"},
                                          mlp_ratio=2, image_size=32, patch_size=8, num_labels=10,
                                          num_register_tokens=2, layerscale_value=1e-5)
    return hf.Dinov2WithRegistersForImageClassification(config), {"pixel_values": image_batch()}


def sam_vision() -> tuple[nn.Module, dict]:
    # SAM's image encoder: relative-position tables initialised to zero, the library's initializer_range 1e-10
    config = hf.SamVisionConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, mlp_dim=128,
                                image_size=32, patch_size=8, output_channels=32, window_size=2,
                                global_attn_indexes=[1], use_rel_pos=True)
    return hf.SamVisionModel(config), {"pixel_values": image_batch()}


def vit_mae_pretraining() -> tuple[nn.Module, dict]:
    # the reconstruction loss is computed in forward (pred - target on the masked patches)
    config = hf.ViTMAEConfig(**SMALL, image_size=32, patch_size=8, decoder_hidden_size=32,
                             decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                             decoder_intermediate_size=64, mask_ratio=0.5)
    return hf.ViTMAEForPreTraining(config), {"pixel_values": image_batch()}


def focalnet() -> tuple[nn.Module, dict]:
    config = hf.FocalNetConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], focal_levels=[2, 2],
                               num_labels=10, use_layerscale=True, layerscale_value=1e-4)
    return hf.FocalNetForImageClassification(config), {"pixel_values": image_batch()}


def pvt_v2() -> tuple[nn.Module, dict]:
    config = hf.PvtV2Config(image_size=32, depths=[1, 1], hidden_sizes=[16, 32], num_attention_heads=[1, 2],
                            sr_ratios=[2, 1], mlp_ratios=[2, 2], patch_sizes=[7, 3], strides=[4, 2],
                            num_encoder_blocks=2, num_labels=10)
    return hf.PvtV2ForImageClassification(config), {"pixel_values": image_batch()}


class Bottleneck(nn.Module):
    """torchvision's ResNet bottleneck: 1x1, 3x3, 1x1 convs with BatchNorm, a projection shortcut on a change."""

    def __init__(self, cin: int, width: int, stride: int = 1) -> None:
        super().__init__()
        cout = width * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class BasicBlock(nn.Module):
    """torchvision's ResNet basic block (two 3x3 convs with BatchNorm)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class TorchvisionResNet(nn.Module):
    """torchvision's ResNet layout and init loop (kaiming_normal_ fan_out on convs, BN gains 1, default Linear)."""

    def __init__(self, bottleneck: bool, blocks: tuple[int, ...] = (2, 2, 2, 2), classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 7, 2, 3, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
                                  nn.MaxPool2d(3, 2, 1))
        stages, cin = [], 16
        for index, count in enumerate(blocks):
            width = 16 * 2**index
            for block in range(count):
                stride = 2 if block == 0 and index > 0 else 1
                if bottleneck:
                    stages.append(Bottleneck(cin, width, stride))
                    cin = width * 4
                else:
                    stages.append(BasicBlock(cin, width, stride))
                    cin = width
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.constant_(module.weight, 1)
                nn.init.constant_(module.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))


def torchvision_resnet18() -> tuple[nn.Module, Tensor]:
    return TorchvisionResNet(bottleneck=False), image_batch(64)


def torchvision_resnet50() -> tuple[nn.Module, Tensor]:
    return TorchvisionResNet(bottleneck=True, blocks=(1, 1, 1, 1)), image_batch(64)


def _hf(name: str, build, model_class: str, reduced: str, expected: dict[str, str] | None = None) -> ZooEntry:
    return ZooEntry(name, build, f"transformers {model_class}", reduced, expected or {})


SPIKE_NO_MORE = {
    "embedding.scale": "right: N(0, 0.02) embeddings enter the pre-LN residual stream unscaled, the setting Takase "
    "et al. 2023 (Spike No More) show to cause loss spikes; scaled embeddings or an embedding LayerNorm fix it"
}
MAE_XAVIER = {
    "init.scale": "right: the MAE reference code (He et al. 2022, facebookresearch/mae models_mae.py) initialises "
    "every Linear with xavier_uniform_; the library's N(0, 0.02) starts the decoder's pre-LN stream ~7x below it "
    "(Takase et al. 2023: a small stream under pre-LN branches spikes)"
}


STOCK_WIDER: list[ZooEntry] = [
    _hf("wav2vec2-ctc", wav2vec2, "Wav2Vec2ForCTC", AUDIO),
    _hf("wav2vec2-ctc-labels", wav2vec2_with_labels, "Wav2Vec2ForCTC with labels (CTC loss in forward)", AUDIO),
    _hf("hubert-ctc", hubert, "HubertForCTC", AUDIO),
    _hf("wavlm-ctc", wavlm, "WavLMForCTC", AUDIO),
    _hf("data2vec-audio-ctc", data2vec_audio, "Data2VecAudioForCTC", AUDIO),
    _hf("whisper", whisper, "WhisperForConditionalGeneration", "2+2 layers, d_model 64, 16 mel bins x 32 frames",
        SPIKE_NO_MORE),
    _hf("audio-spectrogram-transformer", audio_spectrogram_transformer, "ASTForAudioClassification",
        "2 layers, width 64, 32 mel bins x 32 frames, batch 2"),
    _hf("mixtral-moe", mixtral, "MixtralForCausalLM", TEXT + ", 4 experts, top-2", SPIKE_NO_MORE),
    _hf("qwen2-moe", qwen2_moe, "Qwen2MoeForCausalLM", TEXT + ", 4 experts, top-2, shared expert", SPIKE_NO_MORE),
    _hf("olmoe", olmoe, "OlmoeForCausalLM", TEXT + ", 4 experts, top-2", SPIKE_NO_MORE),
    _hf("gemma2-softcap", gemma2, "Gemma2ForCausalLM", TEXT + ", logit softcaps 30 (final) and 50 (attention)"),
    _hf("qwen3", qwen3, "Qwen3ForCausalLM", TEXT + ", QK-norm", SPIKE_NO_MORE),
    _hf("olmo2", olmo2, "Olmo2ForCausalLM", TEXT + ", QK-norm, post-norm branches"),
    _hf("mamba", mamba, "MambaForCausalLM", "2 layers, width 64, state 8, vocab 128, batch 4 x 16 tokens"),
    _hf("zaya", zaya, "ZayaForCausalLM (residual add as a gain module, QK-norm temperature 0)",
        TEXT + ", 2 KV heads, 4 experts", SPIKE_NO_MORE),
    _hf("ergo", ergo, "ErgoForCausalLM (residual add as a learned gate module)", TEXT + ", 2 KV heads, 4 experts",
        SPIKE_NO_MORE),
    _hf("modernbert-mlm", modernbert, "ModernBertForMaskedLM", TEXT),
    _hf("bert-seqcls-labels", bert_sequence_classification_with_labels,
        "BertForSequenceClassification with labels (cross-entropy in forward)", TEXT),
    _hf("clip", clip, "CLIPModel (text and vision towers)", "2+2 layers, width 64, 32x32 images, 16 tokens",
        SPIKE_NO_MORE),
    _hf("siglip-vision", siglip_vision, "SiglipVisionModel (attention-pooling head)", "2 layers, width 64, " + IMAGE),
    _hf("deit-with-teacher", deit_with_teacher, "DeiTForImageClassificationWithTeacher (two heads averaged)",
        "2 layers, width 64, patch 8, " + IMAGE),
    _hf("swinv2", swinv2, "Swinv2ForImageClassification (position-bias MLP, 16 * sigmoid)",
        "depths 2+2, embed 32, window 4, " + IMAGE),
    _hf("dinov2-registers", dinov2_registers, "Dinov2WithRegistersForImageClassification (LayerScale module)",
        "2 layers, width 64, 2 registers, layerscale 1e-5, " + IMAGE),
    _hf("sam-vision", sam_vision, "SamVisionModel (relative-position tables at zero, initializer_range 1e-10)",
        "2 layers (1 windowed, 1 global), width 64, patch 8, " + IMAGE),
    _hf("vit-mae-pretraining", vit_mae_pretraining, "ViTMAEForPreTraining (reconstruction loss in forward)",
        "2 + 1 decoder layers, width 64/32, mask 0.5, " + IMAGE, MAE_XAVIER),
    _hf("focalnet", focalnet, "FocalNetForImageClassification (LayerScale 1e-4)", "2 stages x 1 block, " + IMAGE),
    _hf("pvt-v2", pvt_v2, "PvtV2ForImageClassification", "2 stages x 1 block, 16/32 ch, " + IMAGE),
    ZooEntry("torchvision-resnet18", torchvision_resnet18, "torchvision-style ResNet-18 (BasicBlock, init loop)",
             "widths / 4, 64x64 images, batch 4"),
    ZooEntry("torchvision-resnet50", torchvision_resnet50, "torchvision-style ResNet-50 (Bottleneck, init loop)",
             "1 block per stage, widths / 4, 64x64 images, batch 4"),
]
"""Stock architectures of diagnosis v3 (library-default init, reduced sizes): no error, no uncited warning."""


# ---- deliberate inits from the literature (good controls) ----

def _features(batch: int = 64, width: int = 64) -> Tensor:
    return torch.randn(batch, width, generator=generator())


class FixupBlock(nn.Module):
    """Fixup (Zhang et al. 2019): no normalization; the branch's last layer zero-initialised, the others scaled by
    L^(-1/(2m-2)), scalar biases and a scalar multiplier."""

    def __init__(self, width: int, blocks: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, width, bias=False), nn.Linear(width, width, bias=False)
        nn.init.normal_(self.fc1.weight, std=math.sqrt(2 / width) * blocks ** -0.5)
        nn.init.zeros_(self.fc2.weight)
        self.bias1, self.bias2 = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.fc1(x + self.bias1))
        return x + self.fc2(out) * self.scale + self.bias2


class ResidualStack(nn.Module):
    """A stem, ``blocks`` residual blocks, a head: the shared frame of the residual good controls."""

    def __init__(self, blocks: list[nn.Module], width: int = 64) -> None:
        super().__init__()
        self.stem = nn.Linear(64, width)
        nn.init.kaiming_normal_(self.stem.weight, nonlinearity="linear")
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(width, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def fixup() -> tuple[nn.Module, Tensor]:
    return ResidualStack([FixupBlock(64, 16) for _ in range(16)]), _features()


class GatedBlock(nn.Module):
    """ReZero (Bachlechner et al. 2020) / SkipInit (De & Smith 2020): ``x + alpha * f(x)`` with alpha = 0."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)
        nn.init.kaiming_normal_(self.fc1.weight, nonlinearity="relu")
        self.alpha = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.alpha * self.fc2(F.relu(self.fc1(x)))


def rezero() -> tuple[nn.Module, Tensor]:
    return ResidualStack([GatedBlock(64) for _ in range(24)]), _features()


class SkipInitBlock(nn.Module):
    """SkipInit (De & Smith 2020) with the gate as a module of its own: a learnable scalar initialised to 0."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.branch = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
        nn.init.kaiming_normal_(self.branch[0].weight, nonlinearity="relu")
        self.gate = Scale(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.gate(self.branch(x))


class Scale(nn.Module):
    """``gamma * x`` (LayerScale, Touvron et al. 2021; a SkipInit gate): a learnable per-channel or scalar factor."""

    def __init__(self, gamma: Tensor) -> None:
        super().__init__()
        self.gamma = nn.Parameter(gamma)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


def skipinit() -> tuple[nn.Module, Tensor]:
    return ResidualStack([SkipInitBlock(64) for _ in range(24)]), _features()


class PostLNBlock(nn.Module):
    """DeepNet (Wang et al. 2022): post-LN ``LN(alpha * x + f(x))`` with branch weights scaled by beta."""

    def __init__(self, width: int, alpha: float, beta: float) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)
        for layer in (self.fc1, self.fc2):
            nn.init.xavier_normal_(layer.weight, gain=beta)
            nn.init.zeros_(layer.bias)
        self.norm = nn.LayerNorm(width)
        self.alpha = alpha

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.alpha * x + self.fc2(F.gelu(self.fc1(x))))


def deepnet() -> tuple[nn.Module, Tensor]:
    layers = 24  # encoder-only DeepNet: alpha = (2N)^(1/4), beta = (8N)^(-1/4)
    blocks = [PostLNBlock(64, (2 * layers) ** 0.25, (8 * layers) ** -0.25) for _ in range(layers)]
    return ResidualStack(blocks), _features()


def _plain(depth: int, activation: type[nn.Module], init) -> nn.Sequential:
    layers: list[nn.Module] = []
    for index in range(depth):
        linear = nn.Linear(64, 64 if index < depth - 1 else 10)
        init(linear.weight)
        nn.init.zeros_(linear.bias)
        layers += [linear] + ([activation()] if index < depth - 1 else [])
    return nn.Sequential(*layers)


def selu_lecun() -> tuple[nn.Module, Tensor]:
    # self-normalising network (Klambauer et al. 2017): SELU with LeCun normal init, 16 layers, no normalization
    return _plain(16, nn.SELU, lambda w: nn.init.kaiming_normal_(w, nonlinearity="linear")), _features()


def orthogonal_tanh() -> tuple[nn.Module, Tensor]:
    # dynamical isometry (Saxe et al. 2014; Pennington et al. 2017): orthogonal weights near the critical tanh gain
    return _plain(24, nn.Tanh, lambda w: nn.init.orthogonal_(w, gain=1.0)), _features()


class MuPMLP(nn.Module):
    """muP (Yang & Hu 2021): He-initialised hidden layers, a zero-initialised readout scaled by 1/width."""

    def __init__(self, width: int = 256, depth: int = 6) -> None:
        super().__init__()
        self.hidden = nn.ModuleList(nn.Linear(64 if i == 0 else width, width) for i in range(depth))
        for layer in self.hidden:
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)
        self.readout = nn.Linear(width, 10)
        nn.init.zeros_(self.readout.weight)
        self.width = width

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.readout(x) / self.width


def mup_readout() -> tuple[nn.Module, Tensor]:
    return MuPMLP(), _features()


class LayerScaleModuleBlock(nn.Module):
    """A pre-LN ViT block whose LayerScale gains (1e-6) live in ``Scale`` modules (timm's ``LayerScale``)."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, 4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.ls1, self.ls2 = Scale(torch.full((width,), 1e-6)), Scale(torch.full((width,), 1e-6))

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.ls1(self.attn(h, h, h, need_weights=False)[0])
        return x + self.ls2(self.mlp(self.norm2(x)))


class LayerScaleModuleViT(nn.Module):
    """Patch embedding, class token, 4 LayerScale-module blocks, a head on the class token."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, width, 8, 8)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(torch.randn(1, 17, width) * 0.02)
        self.blocks = nn.Sequential(*[LayerScaleModuleBlock(width) for _ in range(4)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 10)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos
        return self.head(self.norm(self.blocks(tokens))[:, 0])


def layerscale_module_vit() -> tuple[nn.Module, Tensor]:
    return LayerScaleModuleViT(), image_batch()


class AffineResMLPBlock(nn.Module):
    """ResMLP (Touvron et al. 2021): per-channel ``alpha * x + beta`` affine modules instead of normalization,
    LayerScale 0.1 on both branches."""

    def __init__(self, width: int, tokens: int) -> None:
        super().__init__()
        self.affine1, self.affine2 = Affine(width), Affine(width)
        self.token_mix = nn.Linear(tokens, tokens)
        self.channel_mix = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.ls1, self.ls2 = Scale(torch.full((width,), 0.1)), Scale(torch.full((width,), 0.1))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.token_mix(self.affine1(x).transpose(1, 2)).transpose(1, 2))
        return x + self.ls2(self.channel_mix(self.affine2(x)))


class Affine(nn.Module):
    """``alpha * x + beta`` per channel (ResMLP's replacement for LayerNorm)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.alpha, self.beta = nn.Parameter(torch.ones(width)), nn.Parameter(torch.zeros(width))

    def forward(self, x: Tensor) -> Tensor:
        return self.alpha * x + self.beta


class ResMLP(nn.Module):
    """12 ResMLP blocks over 16 patch tokens (4 x 4 of 8x8 pixels), mean-pooled head."""

    def __init__(self, width: int = 64, blocks: int = 12) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, width, 8, 8)
        self.blocks = nn.Sequential(*[AffineResMLPBlock(width, 16) for _ in range(blocks)])
        self.affine = Affine(width)
        self.head = nn.Linear(width, 10)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        return self.head(self.affine(self.blocks(tokens)).mean(1))


def resmlp() -> tuple[nn.Module, Tensor]:
    return ResMLP(), image_batch()


GOOD_WIDER: list[ZooEntry] = [
    ZooEntry("fixup", fixup, "Fixup (Zhang et al. 2019): 16 residual blocks, no normalization, last layer 0",
             "MLP width 64, batch 64"),
    ZooEntry("rezero", rezero, "ReZero (Bachlechner et al. 2020): x + alpha * f(x), alpha = 0 (a parameter)",
             "24 blocks, MLP width 64, batch 64"),
    ZooEntry("skipinit-module", skipinit, "SkipInit (De & Smith 2020): the zero gate as a module",
             "24 blocks, MLP width 64, batch 64"),
    ZooEntry("deepnet", deepnet, "DeepNet (Wang et al. 2022): post-LN, alpha = (2N)^1/4, beta = (8N)^-1/4",
             "24 blocks, MLP width 64, batch 64"),
    ZooEntry("selu-lecun", selu_lecun, "SELU with LeCun normal init (Klambauer et al. 2017), no normalization",
             "16 layers, width 64, batch 64"),
    ZooEntry("orthogonal-tanh", orthogonal_tanh, "orthogonal deep tanh (Saxe et al. 2014, Pennington et al. 2017)",
             "24 layers, width 64, batch 64"),
    ZooEntry("mup-readout", mup_readout, "muP readout (Yang & Hu 2021): zero readout, output / width",
             "6 hidden layers, width 256, batch 64"),
    ZooEntry("layerscale-module-vit", layerscale_module_vit, "ViT with LayerScale 1e-6 as modules (timm style)",
             "4 blocks, width 64, patch 8, " + IMAGE),
    ZooEntry("resmlp-affine", resmlp, "ResMLP (Touvron et al. 2021): per-channel affine modules, LayerScale 0.1",
             "12 blocks, width 64, 16 patches, " + IMAGE),
]
"""The literature's deliberate inits: no warning or error."""
