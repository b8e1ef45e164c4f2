"""Architectures written here with the init code of their public reference implementations.

torchvision and timm are not installable beside the CPU build of torch used here, so these reproduce their
modules and their ``_init_weights``/constructor init loops (torchvision ``vgg.py``, ``densenet.py``,
``mobilenetv3.py``, ``resnet.py`` with ``zero_init_residual=True``, ``vision_transformer.py``; timm
``mlp_mixer.py`` and ``cait.py``) at reduced widths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import transformers as hf
from torch import Tensor, nn

from tests.zoo.entry import image_batch


def _pixels() -> Tensor:
    return image_batch(32)


class VGG(nn.Module):
    """torchvision ``VGG`` (configuration "A", no BN) with conv widths / 4 and a 1024-wide classifier."""

    def __init__(self, widths: tuple = (16, "M", 32, "M", 64, 64, "M", 128, 128, "M", 128, 128, "M")) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for width in widths:
            if width == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True)]
                channels = width
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(channels * 49, 1024), nn.ReLU(True), nn.Dropout(),
            nn.Linear(1024, 1024), nn.ReLU(True), nn.Dropout(),
            nn.Linear(1024, 10),
        )
        for m in self.modules():  # torchvision vgg.py
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def vgg() -> tuple[nn.Module, Tensor]:
    return VGG(), _pixels()


class _DenseLayer(nn.Module):
    def __init__(self, channels: int, growth: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(channels), nn.Conv2d(channels, 4 * growth, 1, bias=False)
        self.norm2, self.conv2 = nn.BatchNorm2d(4 * growth), nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, features: list[Tensor]) -> Tensor:
        x = torch.cat(features, 1)
        return self.conv2(F.relu(self.norm2(self.conv1(F.relu(self.norm1(x))))))


class DenseNet(nn.Module):
    """torchvision ``DenseNet`` (BN-ReLU-Conv bottleneck layers, concatenation, transitions) at growth 8."""

    def __init__(self, growth: int = 8, blocks: tuple[int, ...] = (3, 3)) -> None:
        super().__init__()
        channels = 2 * growth
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                                  nn.ReLU(inplace=True))
        self.blocks = nn.ModuleList()
        self.transitions = nn.ModuleList()
        for index, count in enumerate(blocks):
            self.blocks.append(nn.ModuleList(_DenseLayer(channels + i * growth, growth) for i in range(count)))
            channels += count * growth
            if index < len(blocks) - 1:
                self.transitions.append(nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
                                                      nn.Conv2d(channels, channels // 2, 1, bias=False),
                                                      nn.AvgPool2d(2, 2)))
                channels //= 2
        self.norm = nn.BatchNorm2d(channels)
        self.classifier = nn.Linear(channels, 10)
        for m in self.modules():  # torchvision densenet.py
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for index, block in enumerate(self.blocks):
            features = [x]
            for layer in block:
                features.append(layer(features))
            x = torch.cat(features, 1)
            if index < len(self.transitions):
                x = self.transitions[index](x)
        x = F.adaptive_avg_pool2d(F.relu(self.norm(x)), 1)
        return self.classifier(torch.flatten(x, 1))


def densenet() -> tuple[nn.Module, Tensor]:
    return DenseNet(), _pixels()


class SqueezeExcitation(nn.Module):
    """torchvision ``SqueezeExcitation`` with the hard-sigmoid gate of MobileNetV3."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(channels, squeeze, 1), nn.Conv2d(squeeze, channels, 1)
        self.activation, self.scale_activation = nn.ReLU(), nn.Hardsigmoid()

    def forward(self, x: Tensor) -> Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return scale * x


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
             activation: type[nn.Module] | None = nn.Hardswish) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
              nn.BatchNorm2d(cout, eps=0.001, momentum=0.01)]
    return nn.Sequential(*layers, *([activation()] if activation else []))


class InvertedResidual(nn.Module):
    """MobileNetV3 block: expand 1x1, depthwise, optional SE, project 1x1; identity skip when shapes match."""

    def __init__(self, cin: int, expanded: int, cout: int, stride: int, se: bool, activation: type[nn.Module]):
        super().__init__()
        layers: list[nn.Module] = []
        if expanded != cin:
            layers.append(_conv_bn(cin, expanded, 1, activation=activation))
        layers.append(_conv_bn(expanded, expanded, 3, stride, groups=expanded, activation=activation))
        if se:
            layers.append(SqueezeExcitation(expanded, max(8, expanded // 4)))
        layers.append(_conv_bn(expanded, cout, 1, activation=None))
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(x)
        return out + x if self.use_residual else out


class MobileNetV3(nn.Module):
    """torchvision ``MobileNetV3`` (small-like settings, 4 blocks) with its init loop."""

    def __init__(self) -> None:
        super().__init__()
        settings = [(16, 16, 16, 2, True, nn.ReLU), (16, 72, 24, 2, False, nn.ReLU),
                    (24, 88, 24, 1, False, nn.ReLU), (24, 96, 40, 2, True, nn.Hardswish)]
        self.features = nn.Sequential(
            _conv_bn(3, 16, 3, 2),
            *(InvertedResidual(*setting) for setting in settings),
            _conv_bn(40, 240, 1),
        )
        self.classifier = nn.Sequential(nn.Linear(240, 1024), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(1024, 10))
        for m in self.modules():  # torchvision mobilenetv3.py
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


def mobilenet_v3() -> tuple[nn.Module, Tensor]:
    return MobileNetV3(), _pixels()


class BasicBlock(nn.Module):
    """torchvision ``BasicBlock``: conv-BN-ReLU-conv-BN, identity or 1x1-conv shortcut, ReLU after the add."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision ``ResNet`` of basic blocks built with ``zero_init_residual=True`` (Goyal et al. 2017)."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), blocks: int = 2) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        layers, channels = [], widths[0]
        for index, width in enumerate(widths):
            for block in range(blocks):
                layers.append(BasicBlock(channels, width, 2 if index and not block else 1))
                channels = width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(channels, 10)
        for m in self.modules():  # torchvision resnet.py
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        for m in self.modules():
            if isinstance(m, BasicBlock):
                nn.init.constant_(m.bn2.weight, 0)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def zero_init_residual_resnet() -> tuple[nn.Module, Tensor]:
    return ResNet(), _pixels()


class MixerBlock(nn.Module):
    def __init__(self, tokens: int, width: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width, eps=1e-6), nn.LayerNorm(width, eps=1e-6)
        self.mlp_tokens = nn.Sequential(nn.Linear(tokens, tokens * 2), nn.GELU(), nn.Linear(tokens * 2, tokens))
        self.mlp_channels = nn.Sequential(nn.Linear(width, width * 4), nn.GELU(), nn.Linear(width * 4, width))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.mlp_channels(self.norm2(x))


class MlpMixer(nn.Module):
    """timm ``MlpMixer`` with its ``_init_weights``: zero head, Xavier-uniform MLPs, LeCun-normal stem."""

    def __init__(self, width: int = 64, depth: int = 4, patch: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, patch, patch)
        self.blocks = nn.Sequential(*(MixerBlock((32 // patch) ** 2, width) for _ in range(depth)))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, 10)
        for name, m in self.named_modules():  # timm mlp_mixer.py _init_weights
            if isinstance(m, nn.Linear):
                if name.startswith("head"):
                    nn.init.zeros_(m.weight)
                    nn.init.zeros_(m.bias)
                else:
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.normal_(m.bias, std=1e-6) if "mlp" in name else nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
                nn.init.trunc_normal_(m.weight, std=(1 / fan_in) ** 0.5)  # lecun_normal_
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.stem(x).flatten(2).transpose(1, 2))
        return self.head(self.norm(x).mean(1))


def mlp_mixer() -> tuple[nn.Module, Tensor]:
    return MlpMixer(), _pixels()


class ZeroHeadViT(nn.Module):
    """A ViT encoder (transformers ``ViTModel`` init) with torchvision's zero-initialised classification head."""

    def __init__(self) -> None:
        super().__init__()
        config = hf.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                              image_size=32, patch_size=8)
        self.encoder = hf.ViTModel(config, add_pooling_layer=False)
        self.head = nn.Linear(64, 10)
        nn.init.zeros_(self.head.weight)  # torchvision vision_transformer.py
        nn.init.zeros_(self.head.bias)

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.head(self.encoder(pixel_values=pixel_values).last_hidden_state[:, 0])


def vit_zero_head() -> tuple[nn.Module, Tensor]:
    return ZeroHeadViT(), _pixels()


class LayerScaleBlock(nn.Module):
    """timm/CaiT ``LayerScaleBlock``: ``x + gamma * branch(norm(x))`` with ``gamma`` initialised to 1e-5."""

    def __init__(self, width: int, heads: int = 4, init_values: float = 1e-5) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width, eps=1e-6), nn.LayerNorm(width, eps=1e-6)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.gamma_1 = nn.Parameter(init_values * torch.ones(width))
        self.gamma_2 = nn.Parameter(init_values * torch.ones(width))

    def attention(self, x: Tensor) -> Tensor:
        batch, tokens, width = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        weights = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(batch, tokens, width))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.gamma_1 * self.attention(self.norm1(x))
        return x + self.gamma_2 * self.mlp(self.norm2(x))


class LayerScaleViT(nn.Module):
    """Patch embedding + LayerScale blocks + LayerNorm + head, timm's ``trunc_normal_(std=.02)`` init."""

    def __init__(self, width: int = 64, depth: int = 4, patch: int = 8) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, width, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, (32 // patch) ** 2 + 1, width))
        self.blocks = nn.Sequential(*(LayerScaleBlock(width) for _ in range(depth)))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, 10)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():  # timm cait.py _init_weights
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


def layerscale_vit() -> tuple[nn.Module, Tensor]:
    return LayerScaleViT(), _pixels()
