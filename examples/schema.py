"""Structured-config schemas for ``conf/``: a typo or a wrong type fails when Hydra composes, not mid-run.

Each YAML option of a typed group starts its defaults list with one of the schemas stored here (e.g.
``conf/model/mlp.yaml`` with ``- /schema/model/stack@_here_``), so OmegaConf knows every key and its type:
``model.depht=3`` is refused as an unknown key and ``model.depth=deep`` as a value that is not an int, both
before any data is loaded. The ``gradstab`` group has no schema here on purpose: its options are the callbacks'
constructor arguments, which the callbacks validate themselves when they are instantiated, first thing in the
run.

Example::

    from examples.schema import register_schemas

    register_schemas()  # then compose "config" from conf/
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

INITS = ("xavier", "he", "standard", "pytorch")
NORMS = ("none", "batch", "layer")
CELLS = ("rnn", "lstm", "gru")
ACTIVATION_NAMES = ("relu", "tanh", "sigmoid", "gelu")
MODEL_CHOICES: dict[str, tuple[str, ...]] = {
    "init": INITS, "norm": NORMS, "cell": CELLS, "activation": ACTIVATION_NAMES
}
"""The accepted values of the model options that take a name (``examples.models`` builds from these), checked on
the command line before anything loads (``examples.config_check``)."""


@dataclass
class DigitsTaskSchema:
    """scikit-learn's 8x8 digits (``examples.tasks.digits.DigitsTask``)."""

    _target_: str = "examples.tasks.digits.DigitsTask"
    batch_size: int = 32
    val_fraction: float = 0.2
    split_seed: int = 0


@dataclass
class SequenceTaskSchema:
    """Pascanu et al.'s temporal-order / adding problems (``examples.tasks.sequences.SequenceTask``)."""

    _target_: str = "examples.tasks.sequences.SequenceTask"
    batch_size: int = 20
    problem: str = "temporal_order"
    seq_len: int = 50
    num_train_sequences: int = 2000
    num_val_sequences: int = 500
    data_seed: int = 0


@dataclass
class CharLMTaskSchema:
    """Character language model on standard-library source (``examples.tasks.lm.CharLMTask``)."""

    _target_: str = "examples.tasks.lm.CharLMTask"
    batch_size: int = 32
    block_size: int = 64
    modules: list[str] = field(
        default_factory=lambda: ["textwrap", "argparse", "json.decoder", "string", "heapq", "bisect", "fractions"]
    )
    max_chars: int = 200_000
    z_loss: float = 0.0
    cosine_steps: int = 0


@dataclass
class StackSchema:
    """Deep MLP or CNN stack (``examples.models.build_mlp`` / ``build_cnn``), bound here, sized by the task."""

    _target_: str = "examples.models.build_mlp"
    _partial_: bool = True
    depth: int = 30
    width: int = 64
    activation: str = "relu"
    init: str = "he"
    norm: str = "none"
    residual: bool = False
    residual_branch_gain: float = 0.1


@dataclass
class RecurrentSchema:
    """One-layer RNN/LSTM/GRU (``examples.models.RecurrentNet``)."""

    _target_: str = "examples.models.RecurrentNet"
    _partial_: bool = True
    cell: str = "rnn"
    hidden_size: int = 50
    recurrent_init_std: float = 0.1
    recurrent_spectral_radius: float | None = None


@dataclass
class GPTSchema:
    """Small character GPT (``examples.models.CharGPT``)."""

    _target_: str = "examples.models.CharGPT"
    _partial_: bool = True
    num_layers: int = 4
    num_heads: int = 4
    embed_dim: int = 128
    pre_ln: bool = True
    qk_layernorm: bool = False


@dataclass
class SGDSchema:
    """``torch.optim.SGD`` bound to its hyper-parameters; the task passes the parameters."""

    _target_: str = "torch.optim.SGD"
    _partial_: bool = True
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0


@dataclass
class AdamWSchema:
    """``torch.optim.AdamW`` bound to its hyper-parameters; the task passes the parameters."""

    _target_: str = "torch.optim.AdamW"
    _partial_: bool = True
    _convert_: str = "all"
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1


@dataclass
class SGDOptimSchema:
    """SGD plus the learning-rate warm-up length (0 = none)."""

    optimizer: SGDSchema = field(default_factory=SGDSchema)
    warmup_steps: int = 0


@dataclass
class AdamWOptimSchema:
    """AdamW plus the learning-rate warm-up length (0 = none)."""

    optimizer: AdamWSchema = field(default_factory=AdamWSchema)
    warmup_steps: int = 0


@dataclass
class TrainerSchema:
    """The ``lightning.pytorch.Trainer`` arguments the examples set; Lightning validates their values."""

    _target_: str = "lightning.pytorch.Trainer"
    accelerator: str = "cpu"
    devices: Any = 1  # an int, a list of device ids, or "auto"
    num_nodes: int = 1
    strategy: Any = "auto"  # a name ("ddp", "ddp_spawn", "fsdp") or a `_target_` strategy node
    precision: str = "32-true"  # "32-true", "bf16-mixed" or "16-mixed"
    max_epochs: int = 20
    max_steps: int = -1
    limit_train_batches: Any = None  # an int (batches) or a float (fraction); None = all
    limit_val_batches: Any = None
    gradient_clip_val: float | None = None
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 10
    num_sanity_val_steps: int = 0
    enable_progress_bar: bool = True
    enable_checkpointing: bool = False  # sweeps compare runs; turn on to keep weights
    enable_model_summary: bool = False


@dataclass
class TensorBoardSchema:
    """TensorBoard event files in ``<job dir>/tensorboard`` (the suite's custom-scalar panels live there)."""

    _target_: str = "lightning.pytorch.loggers.TensorBoardLogger"
    save_dir: str = "${hydra:runtime.output_dir}"
    name: str = "tensorboard"
    version: str = ""
    default_hp_metric: bool = False


@dataclass
class CSVSchema:
    """``metrics.csv`` in ``<job dir>/csv``."""

    _target_: str = "lightning.pytorch.loggers.CSVLogger"
    save_dir: str = "${hydra:runtime.output_dir}"
    name: str = "csv"
    version: str = ""


@dataclass
class ExampleSchema:
    """The root: one node per config group plus the run's seed and name."""

    task: Any = MISSING
    model: Any = MISSING
    optim: Any = MISSING
    gradstab: Any = MISSING
    trainer: Any = MISSING
    logger: Any = MISSING
    seed: int = 0
    name: str = "default"
    stop_after_nonfinite_steps: int = 10
    cpu_threads: int | None = 1


_SCHEMAS: dict[tuple[str | None, str], type] = {
    # stored under schema/<group>/, not in the groups themselves: a wrong choice (`task=foo`) then lists only
    # the real options of the group, not the schemas
    (None, "example_schema"): ExampleSchema,
    ("schema/task", "digits"): DigitsTaskSchema,
    ("schema/task", "rnn"): SequenceTaskSchema,
    ("schema/task", "lm"): CharLMTaskSchema,
    ("schema/model", "stack"): StackSchema,
    ("schema/model", "rnn"): RecurrentSchema,
    ("schema/model", "gpt"): GPTSchema,
    ("schema/optim", "sgd"): SGDOptimSchema,
    ("schema/optim", "adamw"): AdamWOptimSchema,
    ("schema/trainer", "trainer"): TrainerSchema,
    ("schema/logger", "tensorboard"): TensorBoardSchema,
    ("schema/logger", "csv"): CSVSchema,
}


def register_schemas() -> None:
    """Store every schema in Hydra's ``ConfigStore`` under the group and name ``conf/`` refers to."""
    store = ConfigStore.instance()
    for (group, name), schema in _SCHEMAS.items():
        store.store(group=group, name=name, node=schema)
