"""Stock architectures at their library-default init (reduced sizes), and good-practice inits.

Hugging Face ``transformers`` models are instantiated from their config classes (``Model(Config(...))``), so the
weights come from the library's own ``_init_weights``; torch models use torch's defaults. The models in
:mod:`tests.zoo.reference` reproduce the init code of public reference implementations that no pure-PyTorch
library installable here ships (torchvision and timm need a CUDA build of torch).
"""

from __future__ import annotations

import torch
import transformers as hf
from torch import nn

from tests.zoo import reference
from tests.zoo.entry import ZooEntry, image_batch, token_batch

VOCAB = 128
TEXT = "2 layers, width 64, 4 heads, vocab 128, batch 4 x 16 tokens"
IMAGE = "32x32 images, batch 4"


def _text(model_class: type, config: object, **extra: torch.Tensor) -> tuple[nn.Module, dict]:
    return model_class(config), token_batch(VOCAB, **extra)


def _image(model_class: type, config: object, size: int = 32) -> tuple[nn.Module, dict]:
    return model_class(config), {"pixel_values": image_batch(size)}


SIZES = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
         "max_position_embeddings": 32}
"""The reduced size of the text models whose configs use BERT's size names (``overrides`` change one)."""


def _bert_sized(config_class: type, model_class: type, **overrides: object) -> tuple[nn.Module, dict]:
    return _text(model_class, config_class(vocab_size=VOCAB, **{**SIZES, **overrides}))


def gpt2() -> tuple[nn.Module, dict]:
    return _text(hf.GPT2LMHeadModel, hf.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=64, n_layer=2, n_head=4))


def bert() -> tuple[nn.Module, dict]:
    return _bert_sized(hf.BertConfig, hf.BertForMaskedLM)


def roberta() -> tuple[nn.Module, dict]:
    return _bert_sized(hf.RobertaConfig, hf.RobertaForMaskedLM, max_position_embeddings=40)


def distilbert() -> tuple[nn.Module, dict]:
    config = hf.DistilBertConfig(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                                 max_position_embeddings=32)
    return _text(hf.DistilBertForMaskedLM, config)


def albert() -> tuple[nn.Module, dict]:
    # one layer group shared across depth: the same modules run once per layer
    return _bert_sized(hf.AlbertConfig, hf.AlbertForMaskedLM, embedding_size=32, num_hidden_layers=3)


def electra() -> tuple[nn.Module, dict]:
    return _bert_sized(hf.ElectraConfig, hf.ElectraForPreTraining, embedding_size=32)


def _llama_like(config_class: type, model_class: type, **kwargs: object) -> tuple[nn.Module, dict]:
    return _bert_sized(config_class, model_class, num_key_value_heads=2, max_position_embeddings=64, **kwargs)


def llama() -> tuple[nn.Module, dict]:
    return _llama_like(hf.LlamaConfig, hf.LlamaForCausalLM)


def mistral() -> tuple[nn.Module, dict]:
    return _llama_like(hf.MistralConfig, hf.MistralForCausalLM)


def qwen2() -> tuple[nn.Module, dict]:
    return _llama_like(hf.Qwen2Config, hf.Qwen2ForCausalLM)


def gemma() -> tuple[nn.Module, dict]:
    # RMSNorm with (1 + weight), embeddings multiplied by sqrt(hidden_size), tied lm_head
    return _llama_like(hf.GemmaConfig, hf.GemmaForCausalLM, head_dim=16)


def gpt_neo() -> tuple[nn.Module, dict]:
    config = hf.GPTNeoConfig(vocab_size=VOCAB, max_position_embeddings=32, hidden_size=64, num_layers=2,
                             attention_types=[[["global", "local"], 1]], num_heads=4, window_size=8)
    return _text(hf.GPTNeoForCausalLM, config)


def opt() -> tuple[nn.Module, dict]:
    config = hf.OPTConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                          max_position_embeddings=32, word_embed_proj_dim=64)
    return _text(hf.OPTForCausalLM, config)


def gpt_neox() -> tuple[nn.Module, dict]:
    return _bert_sized(hf.GPTNeoXConfig, hf.GPTNeoXForCausalLM)


def bloom() -> tuple[nn.Module, dict]:
    return _text(hf.BloomForCausalLM, hf.BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4))


def t5() -> tuple[nn.Module, dict]:
    # T5LayerNorm (RMS, no mean), decoder output scaled by d_model**-0.5 before the tied lm_head
    config = hf.T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)
    decoder_ids = torch.randint(0, VOCAB, (4, 8), generator=torch.Generator().manual_seed(2))
    return _text(hf.T5ForConditionalGeneration, config, decoder_input_ids=decoder_ids)


def bart() -> tuple[nn.Module, dict]:
    config = hf.BartConfig(vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2,
                           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                           decoder_ffn_dim=128, max_position_embeddings=32)
    decoder_ids = torch.randint(0, VOCAB, (4, 8), generator=torch.Generator().manual_seed(2))
    return _text(hf.BartForConditionalGeneration, config, decoder_input_ids=decoder_ids)


def _vit_like(config_class: type, model_class: type, **kwargs: object) -> tuple[nn.Module, dict]:
    config = config_class(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8,
                          num_labels=10, **kwargs)
    return _image(model_class, config)


def vit() -> tuple[nn.Module, dict]:
    return _vit_like(hf.ViTConfig, hf.ViTForImageClassification, intermediate_size=128)


def deit() -> tuple[nn.Module, dict]:
    return _vit_like(hf.DeiTConfig, hf.DeiTForImageClassification, intermediate_size=128)


def beit() -> tuple[nn.Module, dict]:
    # LayerScale 0.1 and relative position bias by default
    return _vit_like(hf.BeitConfig, hf.BeitForImageClassification, intermediate_size=128)


def dinov2() -> tuple[nn.Module, dict]:
    return _vit_like(hf.Dinov2Config, hf.Dinov2ForImageClassification, mlp_ratio=2)


def swin() -> tuple[nn.Module, dict]:
    config = hf.SwinConfig(image_size=32, patch_size=2, embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=4,
                           num_labels=10)
    return _image(hf.SwinForImageClassification, config)


def convnext() -> tuple[nn.Module, dict]:
    # LayerScale 1e-6 on every block by default
    config = hf.ConvNextConfig(num_stages=2, hidden_sizes=[16, 32], depths=[2, 2], num_labels=10)
    return _image(hf.ConvNextForImageClassification, config)


def convnextv2() -> tuple[nn.Module, dict]:
    # global response normalization (GRN) instead of LayerScale
    config = hf.ConvNextV2Config(num_stages=2, hidden_sizes=[16, 32], depths=[2, 2], num_labels=10)
    return _image(hf.ConvNextV2ForImageClassification, config)


def resnet() -> tuple[nn.Module, dict]:
    # kaiming_normal_(mode="fan_out") on convs (as torchvision)
    config = hf.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                             layer_type="bottleneck", num_labels=10)
    return _image(hf.ResNetForImageClassification, config)


def regnet() -> tuple[nn.Module, dict]:
    # RegNetY: Squeeze-Excitation in every block
    config = hf.RegNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64], depths=[1, 1, 1], groups_width=8,
                             num_labels=10)
    return _image(hf.RegNetForImageClassification, config)


def bit() -> tuple[nn.Module, dict]:
    # weight-standardised convs + GroupNorm (Big Transfer)
    config = hf.BitConfig(embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], num_groups=8, num_labels=10)
    return _image(hf.BitForImageClassification, config)


def efficientnet() -> tuple[nn.Module, dict]:
    # MBConv blocks with Squeeze-Excitation (sigmoid gates)
    config = hf.EfficientNetConfig(image_size=32, width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320,
                                   num_labels=10)
    return _image(hf.EfficientNetForImageClassification, config)


def nemotron_asr_encoder() -> tuple[nn.Module, dict]:
    # NVIDIA's streaming FastConformer encoder: a depthwise-separable conv subsampler (three stride-2 stages, no
    # normalization) in front of Conformer blocks; the library's _init_weights draws every conv N(0, 0.02)
    config = hf.NemotronAsrStreamingEncoderConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                                                  intermediate_size=128, sliding_window=8,
                                                  max_position_embeddings=64, num_hidden_layers=2)
    features = torch.randn(2, 64, 80, generator=torch.Generator().manual_seed(1))
    return hf.NemotronAsrStreamingEncoder(config), {"input_features": features}


def mobilenet_v1() -> tuple[nn.Module, dict]:
    # the config's classifier_dropout_prob=0.999 is TF-slim's keep probability (0.999) read as a drop probability:
    # with it the body receives ~0.1% of the gradient (diagnose reports signal.vanishing, rightly); use 0.001
    config = hf.MobileNetV1Config(image_size=32, depth_multiplier=0.25, num_labels=10, classifier_dropout_prob=0.001)
    return _image(hf.MobileNetV1ForImageClassification, config)


def mobilenet_v2() -> tuple[nn.Module, dict]:
    config = hf.MobileNetV2Config(image_size=32, depth_multiplier=0.35, num_labels=10)
    return _image(hf.MobileNetV2ForImageClassification, config)


def mobilevit() -> tuple[nn.Module, dict]:
    config = hf.MobileViTConfig(image_size=64, hidden_sizes=[32, 48, 64], neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64],
                                num_labels=10)
    return _image(hf.MobileViTForImageClassification, config, size=64)


def segformer() -> tuple[nn.Module, dict]:
    config = hf.SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
                                num_attention_heads=[1, 2], patch_sizes=[7, 3], strides=[4, 2], mlp_ratios=[2, 2],
                                decoder_hidden_size=32, num_labels=5)
    return _image(hf.SegformerForSemanticSegmentation, config)


def levit() -> tuple[nn.Module, dict]:
    config = hf.LevitConfig(image_size=64, hidden_sizes=[32, 48, 64], num_attention_heads=[1, 2, 2], depths=[1, 1, 1],
                            key_dim=[8, 8, 8], num_labels=10)
    return _image(hf.LevitForImageClassification, config, size=64)


def poolformer() -> tuple[nn.Module, dict]:
    # LayerScale 1e-5 on both branches of every block
    config = hf.PoolFormerConfig(depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 48, 64], num_labels=10)
    return _image(hf.PoolFormerForImageClassification, config)


class _Sequence(nn.Module):
    """A torch recurrent stack over a sequence, classifying from the last output (torch's default init)."""

    def __init__(self, cell: type[nn.RNNBase], layers: int = 2) -> None:
        super().__init__()
        self.rnn = cell(16, 64, num_layers=layers, batch_first=True)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


class _CellLoop(nn.Module):
    """An ``nn.GRUCell`` unrolled by hand over the time steps (torch's default init)."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.GRUCell(16, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = x.new_zeros(x.shape[0], 64)
        for step in range(x.shape[1]):
            hidden = self.cell(x[:, step], hidden)
        return self.head(hidden)


class _EncoderClassifier(nn.Module):
    """``nn.TransformerEncoder`` (post-LN, torch's default) over embedded tokens, mean-pooled."""

    def __init__(self, norm_first: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 64)
        layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.1, batch_first=True, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)
        self.head = nn.Linear(64, 10)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(1))


def _sequence_batch() -> torch.Tensor:
    return torch.randn(4, 24, 16, generator=torch.Generator().manual_seed(1))


def lstm() -> tuple[nn.Module, torch.Tensor]:
    return _Sequence(nn.LSTM), _sequence_batch()


def gru() -> tuple[nn.Module, torch.Tensor]:
    return _Sequence(nn.GRU), _sequence_batch()


def gru_cell_loop() -> tuple[nn.Module, torch.Tensor]:
    return _CellLoop(), _sequence_batch()


def transformer_encoder() -> tuple[nn.Module, torch.Tensor]:
    return _EncoderClassifier(), token_batch(VOCAB)["input_ids"]


def _hf(name: str, build, model_class: str, reduced: str = TEXT, expected: dict[str, str] | None = None) -> ZooEntry:
    return ZooEntry(name, build, f"transformers {model_class}", reduced, expected or {})


SPIKE_NO_MORE = {
    "embedding.scale": "right: N(0, 0.02) embeddings enter the pre-LN residual stream unscaled, the setting Takase "
    "et al. 2023 (Spike No More) show to cause loss spikes; scaled embeddings or an embedding LayerNorm fix it"
}
BATCHNORM_CHAIN = {
    "signal.exploding": "right as a measurement: 23 BatchNorm-ReLU6 layers on the path without a shortcut amplify "
    "the delta ~1.16x per layer, close to Yang et al. 2019's sqrt(pi/(pi-1)) ~ 1.2; MobileNetV2 still trains, so "
    "counted as a false alarm"
}


STOCK: list[ZooEntry] = [
    _hf("gpt2", gpt2, "GPT2LMHeadModel", expected=SPIKE_NO_MORE),
    _hf("bert-mlm", bert, "BertForMaskedLM"),
    _hf("roberta-mlm", roberta, "RobertaForMaskedLM"),
    _hf("distilbert-mlm", distilbert, "DistilBertForMaskedLM"),
    _hf("albert-mlm", albert, "AlbertForMaskedLM", "3 shared layers, width 64, embeddings 32, vocab 128"),
    _hf("electra", electra, "ElectraForPreTraining"),
    _hf("llama", llama, "LlamaForCausalLM", TEXT + ", 2 KV heads", expected=SPIKE_NO_MORE),
    _hf("mistral", mistral, "MistralForCausalLM", TEXT + ", 2 KV heads", expected=SPIKE_NO_MORE),
    _hf("qwen2", qwen2, "Qwen2ForCausalLM", TEXT + ", 2 KV heads", expected=SPIKE_NO_MORE),
    _hf("gemma", gemma, "GemmaForCausalLM", TEXT + ", 2 KV heads"),
    _hf("gpt-neo", gpt_neo, "GPTNeoForCausalLM", TEXT + ", global+local attention", expected=SPIKE_NO_MORE),
    _hf("opt", opt, "OPTForCausalLM", expected=SPIKE_NO_MORE),
    _hf("gpt-neox", gpt_neox, "GPTNeoXForCausalLM", expected=SPIKE_NO_MORE),
    _hf("bloom", bloom, "BloomForCausalLM"),
    _hf("t5", t5, "T5ForConditionalGeneration", "2+2 layers, d_model 64, vocab 128, 16 -> 8 tokens"),
    _hf("bart", bart, "BartForConditionalGeneration", "2+2 layers, d_model 64, vocab 128, 16 -> 8 tokens"),
    _hf("vit", vit, "ViTForImageClassification", "2 layers, width 64, patch 8, " + IMAGE),
    _hf("deit", deit, "DeiTForImageClassification", "2 layers, width 64, patch 8, " + IMAGE),
    _hf("beit", beit, "BeitForImageClassification", "2 layers, width 64, patch 8, " + IMAGE),
    _hf("dinov2", dinov2, "Dinov2ForImageClassification", "2 layers, width 64, patch 8, " + IMAGE),
    _hf("swin", swin, "SwinForImageClassification", "depths 2+2, embed 32, window 4, " + IMAGE),
    _hf("convnext", convnext, "ConvNextForImageClassification", "2 stages x 2 blocks, 16/32 channels, " + IMAGE),
    _hf("convnextv2", convnextv2, "ConvNextV2ForImageClassification", "2 stages x 2 blocks, 16/32 ch, " + IMAGE),
    _hf("resnet", resnet, "ResNetForImageClassification", "bottleneck, 4 stages x 1 block, 16..128 ch, " + IMAGE),
    _hf("regnet-y", regnet, "RegNetForImageClassification", "RegNetY, 3 stages x 1 block, 16..64 ch, " + IMAGE),
    _hf("bit", bit, "BitForImageClassification", "2 stages x 1 block, 32/64 ch, " + IMAGE),
    _hf("mobilenet-v1", mobilenet_v1, "MobileNetV1ForImageClassification",
        "depth multiplier 0.25, classifier dropout 0.001, " + IMAGE),
    _hf("mobilenet-v2", mobilenet_v2, "MobileNetV2ForImageClassification", "depth multiplier 0.35, " + IMAGE,
        BATCHNORM_CHAIN),
    _hf("mobilevit", mobilevit, "MobileViTForImageClassification", "XXS-like widths, 64x64 images, batch 4"),
    _hf("segformer", segformer, "SegformerForSemanticSegmentation", "2 stages x 1 block, 16/32 ch, " + IMAGE),
    _hf("levit", levit, "LevitForImageClassification", "3 stages x 1 block, 32..64 ch, 64x64 images, batch 4"),
    _hf("poolformer", poolformer, "PoolFormerForImageClassification", "4 stages x 1 block, 16..64 ch, " + IMAGE),
    ZooEntry("lstm", lstm, "torch nn.LSTM (2 layers) + Linear", "hidden 64, 24 steps, batch 4"),
    ZooEntry("gru", gru, "torch nn.GRU (2 layers) + Linear", "hidden 64, 24 steps, batch 4"),
    ZooEntry("gru-cell-loop", gru_cell_loop, "torch nn.GRUCell unrolled in forward + Linear",
             "hidden 64, 24 steps, batch 4"),
    ZooEntry("transformer-encoder", transformer_encoder, "torch nn.TransformerEncoder (post-LN) + Embedding",
             "3 layers, d_model 64, 16 tokens, batch 4"),
    ZooEntry("vgg", reference.vgg, "torchvision-style VGG-11 (kaiming_normal_ fan_out, Linear N(0, 0.01))",
             "conv widths / 4, classifier 1024 wide (4096 in torchvision), " + IMAGE),
    ZooEntry("densenet", reference.densenet, "DenseNet-BC-style concatenation net (torchvision init)",
             "growth 8, 2 dense blocks x 3 layers, " + IMAGE),
    ZooEntry("mobilenet-v3", reference.mobilenet_v3, "MobileNetV3-style SE, hard-sigmoid/hard-swish (torchvision init)",
             "4 inverted-residual blocks, 16..40 ch, " + IMAGE),
]

BROKEN: list[ZooEntry] = [
    ZooEntry("efficientnet", efficientnet, "transformers EfficientNetForImageClassification",
             "B0 with width 0.25, depth 0.25, " + IMAGE,
             {"signal.vanishing": "right: the stem's weight gradient is exactly 0.0 in a plain backward too; the "
              "library's _init_weights draws every BatchNorm weight (gain) N(0, 0.02) like a Linear's, so each "
              "normalization shrinks its output ~50x and the next one's input variance falls under eps=1e-3 "
              "(Ioffe & Szegedy 2015: BN rescales only when the variance dominates eps); gains of 1 fix it"}),
    ZooEntry("nemotron-asr-encoder", nemotron_asr_encoder, "transformers NemotronAsrStreamingEncoder",
             "2 Conformer layers, width 64, 64 frames x 80 mel bins, batch 2",
             {"signal.vanishing": "right: in a plain backward the gradient reaching the first subsampling conv is "
              "~4e-5 of the one reaching the subsampler's linear layer, and the forward signal falls from std 0.06 "
              "to 1e-5 through it; N(0, 0.02) gives a depthwise 3x3 conv (fan-in 9) a gain of 0.06 (He et al. "
              "2015: std sqrt(2 / fan_in)); He init on the subsampler's convs removes the finding",
              "init.scale": "right: the depthwise and pointwise convs at N(0, 0.02) are 4-17x below He's std for "
              "their fan-in (He et al. 2015), and nothing normalizes between them"}),
]
"""Stock models whose library default itself blocks training (checked with a plain backward): the diagnosis
must find it."""

GOOD: list[ZooEntry] = [
    ZooEntry("zero-init-residual-resnet", reference.zero_init_residual_resnet,
             "ResNet basic blocks, last BN gamma 0 (Goyal et al. 2017; torchvision zero_init_residual)",
             "3 stages x 2 blocks, 16..64 ch, " + IMAGE),
    ZooEntry("mlp-mixer-zero-head", reference.mlp_mixer, "MLP-Mixer with a zero-initialised head (timm init)",
             "4 blocks, width 64, patch 8, " + IMAGE),
    ZooEntry("vit-zero-head", reference.vit_zero_head, "ViT with a zero-initialised head (torchvision init)",
             "transformers ViTModel 2 layers + zero Linear head, " + IMAGE),
    ZooEntry("layerscale-vit", reference.layerscale_vit, "CaiT-style LayerScale ViT blocks (gamma 1e-5)",
             "4 blocks, width 64, patch 8, " + IMAGE),
]
