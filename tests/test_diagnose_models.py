"""Real models for the diagnosis tests, and the specification of the traced model graph on each of them."""

from __future__ import annotations

import functools

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradstab.diagnosis import trace

torch.set_num_threads(1)


@functools.cache
def digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's 8x8 digits (1797 samples, offline), features standardised."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    return x, torch.tensor(data.target)


def digits_batch(size: int = 128) -> Tensor:
    return digits()[0][:size]


def mlp(
    depth: int,
    width: int,
    *,
    init: str | float = "xavier",
    activation: type[nn.Module] = nn.ReLU,
    batchnorm: bool = False,
    seed: int = 0,
) -> nn.Sequential:
    """A plain MLP 64 -> width x (depth-1) -> 10; ``init`` is 'xavier', 'he', or a weight std."""
    generator = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    features = 64
    for _ in range(depth - 1):
        layers.append(nn.Linear(features, width))
        if batchnorm:
            layers.append(nn.BatchNorm1d(width))
        layers.append(activation())
        features = width
    layers.append(nn.Linear(features, 10))
    for layer in layers:
        if isinstance(layer, nn.Linear):
            if init == "xavier":
                nn.init.xavier_normal_(layer.weight, generator=generator)
            elif init == "he":
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu", generator=generator)
            else:
                nn.init.normal_(layer.weight, 0.0, float(init), generator=generator)
            nn.init.zeros_(layer.bias)
    return nn.Sequential(*layers)


class ResidualMLP(nn.Module):
    """Pre-norm residual MLP: ``x = x + Linear(ReLU(Linear(BN(x))))``, functional ReLU at the stem."""

    def __init__(self, width: int = 32, blocks: int = 6) -> None:
        super().__init__()
        self.stem = nn.Linear(64, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.BatchNorm1d(width), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
            for _ in range(blocks)
        )
        self.head = nn.Linear(width, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.stem(x))
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


class PreLNTransformer(nn.Module):
    """A small pre-LN Transformer language model with a learned positional parameter."""

    def __init__(self, vocab: int = 50, d_model: int = 32, layers: int = 4, context: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.position = nn.Parameter(torch.zeros(context, d_model))
        layer = nn.TransformerEncoderLayer(d_model, 4, 64, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.norm(self.encoder(self.embed(tokens) + self.position[: tokens.shape[1]])))


class BasicBlock(nn.Module):
    """ResNet basic block: ``relu(x + bn(conv(relu(bn(conv(x))))))``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class SmallResNet(nn.Module):
    """Stem conv + 4 basic blocks + global average pooling + linear head, for 8x8 digits images."""

    def __init__(self, channels: int = 16, blocks: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.blocks = nn.Sequential(*(BasicBlock(channels) for _ in range(blocks)))
        self.head = nn.Linear(channels, 10)

    def forward(self, x: Tensor) -> Tensor:
        features = self.blocks(F.relu(self.bn(self.stem(x))))
        return self.head(F.adaptive_avg_pool2d(features, 1).flatten(1))


class SequenceClassifier(nn.Module):
    """RNN/LSTM/GRU over a sequence, classifying from the last hidden state."""

    def __init__(self, cell: type[nn.RNNBase] = nn.RNN, hidden: int = 32, features: int = 8) -> None:
        super().__init__()
        self.rnn = cell(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(x)[0][:, -1])


def vanilla_rnn(spectral_radius: float, seed: int = 0) -> SequenceClassifier:
    """A tanh RNN whose recurrent matrix is a Gaussian matrix rescaled to ``spectral_radius``."""
    model = SequenceClassifier(nn.RNN)
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(32, 32, generator=generator)
    weight *= spectral_radius / torch.linalg.eigvals(weight).abs().max()
    with torch.no_grad():
        model.rnn.weight_hh_l0.copy_(weight)
    return model


def orthogonal_gru(seed: int = 0) -> SequenceClassifier:
    """A GRU whose three recurrent gate matrices are each orthogonal."""
    model = SequenceClassifier(nn.GRU)
    generator = torch.Generator().manual_seed(seed)
    hidden = model.rnn.hidden_size
    with torch.no_grad():
        for gate in range(3):
            nn.init.orthogonal_(model.rnn.weight_hh_l0[gate * hidden : (gate + 1) * hidden], generator=generator)
    return model


def sequences(batch: int = 8, length: int = 50) -> Tensor:
    return torch.randn(batch, length, 8, generator=torch.Generator().manual_seed(1))


def tokens(batch: int = 8, length: int = 16) -> Tensor:
    return torch.randint(0, 50, (batch, length), generator=torch.Generator().manual_seed(1))


def images(batch: int = 16) -> Tensor:
    return digits()[0][:batch].reshape(batch, 1, 8, 8)


def _graph(model: nn.Module, inputs: Tensor):
    graph, _ = trace(model, lambda batch: model(batch), inputs=inputs)
    return graph


def test_sequential_mlp_graph_finds_each_layers_activation_and_the_full_plain_chain():
    graph = _graph(mlp(5, 16), digits_batch(8))
    hidden = [layer for layer in graph.layers if layer.name != "8"]
    assert [layer.activation for layer in hidden] == ["relu"] * 4
    assert graph.layer("8").is_output and graph.layer("8").activation is None
    assert graph.plain_depth == 5 and graph.skip_connections == 0
    assert not graph.plain_chain_normalized


def test_functional_activations_and_residual_adds_are_seen_in_forward():
    graph = _graph(ResidualMLP(), digits_batch(8))
    assert graph.layer("stem").activation == "relu"  # F.relu inside forward, not a module
    assert graph.skip_connections == 6
    assert graph.layer("blocks.0.3").feeds_join  # the last layer of each residual branch
    assert graph.layer("blocks.0.1").normalized is False and graph.plain_chain_normalized
    assert graph.plain_depth == 3  # stem + one branch: the skips cut the 14-layer path short


def test_batchnorm_between_layer_and_activation_marks_the_layer_normalized():
    graph = _graph(mlp(4, 16, batchnorm=True), digits_batch(8))
    assert graph.layer("0").normalized and graph.layer("0").activation == "relu"
    assert graph.normalization_layers == ["1", "4", "7"]


def test_pre_ln_transformer_graph_has_residual_stream_and_short_plain_chain():
    graph = _graph(PreLNTransformer(), tokens())
    embed = graph.layer("embed")
    assert embed.kind == "embedding" and embed.normalized and embed.feeds_join
    assert graph.layer("encoder.layers.0.linear1").activation == "relu"
    assert graph.layer("encoder.layers.0.self_attn").kind == "attention"
    assert graph.skip_connections == 8 and graph.plain_depth <= 4
    assert graph.untraced == []  # the positional parameter is used in an add


def test_resnet_block_graph_sees_conv_bn_relu_and_skips():
    graph = _graph(SmallResNet(), images())
    conv = graph.layer("blocks.0.conv1")
    assert conv.kind == "conv" and conv.normalized and conv.activation == "relu"
    assert graph.skip_connections == 4 and graph.plain_depth <= 4


@pytest.mark.parametrize("cell", [nn.RNN, nn.LSTM, nn.GRU])
def test_recurrent_layers_are_traced_with_their_sequence_shape(cell):
    graph = _graph(SequenceClassifier(cell), sequences(length=12))
    assert graph.layer("rnn").kind == "recurrent"
    assert graph.layer("rnn").input_shape == (8, 12, 8)
    assert graph.plain_depth == 2


def test_torchscript_model_cannot_be_hooked_and_the_graph_says_why():
    graph = _graph(torch.jit.script(mlp(3, 8)), digits_batch(4))
    assert graph.layers == [] and "ScriptModule" in graph.problems[0]


class DigitsClassifier(pl.LightningModule):
    """A LightningModule around any digits network; SGD with momentum (He et al. 2015's setting)."""

    def __init__(self, net: nn.Module, lr: float = 0.003, image: bool = False) -> None:
        super().__init__()
        self.net = net
        self.lr = lr
        self.image = image

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.reshape(-1, 1, 8, 8) if self.image else x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def digits_loader(batch_size: int = 32, size: int | None = None, seed: int = 0) -> DataLoader:
    x, y = digits()
    dataset = TensorDataset(x[:size], y[:size])
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))


def training_error(model: nn.Module) -> float:
    x, y = digits()
    with torch.no_grad():
        return (model(x).argmax(1) != y).float().mean().item()


def quiet_trainer(**kwargs) -> pl.Trainer:
    """A CPU trainer without progress bars or checkpoints (tests pass loggers and callbacks)."""
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return pl.Trainer(**{**defaults, **kwargs})
