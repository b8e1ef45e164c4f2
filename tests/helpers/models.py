"""Tiny real models and data the tests train or diagnose for a few CPU steps (no downloads)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset


def regression_data(n: int = 64, features: int = 8, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=generator)
    y = x @ torch.randn(features, 1, generator=generator) + 0.1 * torch.randn(n, 1, generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)


def tanh_mlp(width: int = 16, depth: int = 3, features: int = 8) -> nn.Sequential:
    """``features -> width x (depth - 1) -> 1`` with tanh between the ``depth`` linear layers, at torch's default
    init (drawn from the global generator, layer by layer: seed before calling it for fixed weights)."""
    layers: list[nn.Module] = [nn.Linear(features, width), nn.Tanh()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.Tanh()]
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


class TinyRegressor(pl.LightningModule):
    """An MLP regressor trained with SGD; ``frozen`` freezes its first layer, ``tied`` ties two layers."""

    def __init__(self, width: int = 16, depth: int = 3, lr: float = 0.05, frozen: bool = False, tied: bool = False):
        super().__init__()
        self.net = tanh_mlp(width, depth)
        if frozen:
            self.net[0].requires_grad_(False)
        if tied and depth >= 4:
            self.net[4].weight = self.net[2].weight
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr)

    def train_dataloader(self):
        return regression_data()


class TwoOptimizerModule(pl.LightningModule):
    """GAN-style manual optimization: two sub-networks, two optimizers, both stepped every batch."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
        self.critic = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, _ = batch
        opt_g, opt_c = self.optimizers()
        critic_loss = self.critic(self.generator(x).detach()).mean() - self.critic(x).mean()
        opt_c.zero_grad()
        self.manual_backward(critic_loss)
        opt_c.step()
        generator_loss = -self.critic(self.generator(x)).mean()
        opt_g.zero_grad()
        self.manual_backward(generator_loss)
        opt_g.step()

    def configure_optimizers(self):
        return (
            torch.optim.Adam(self.generator.parameters(), lr=1e-3),
            torch.optim.Adam(self.critic.parameters(), lr=1e-3),
        )

    def train_dataloader(self):
        return regression_data()


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
