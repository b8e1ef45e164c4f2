"""The example configs (conf/): composition, schema validation, presets and the multi-GPU trainer configs.

Composed with Hydra's compose API in-process (no training); one test runs the real command line to show
the message a user sees for a typo.
"""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from examples.schema import TrainerSchema, register_schemas
from examples.tasks.base import ExampleTask
from tests.helpers.subprocess_env import REPO, child_env

CONF = REPO / "conf"
PRESETS = sorted(path.stem for path in (CONF / "experiment").glob("*.yaml"))

register_schemas()


def compose_config(*overrides: str, return_hydra_config: bool = False):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=return_hydra_config)


def build_task(*overrides: str) -> ExampleTask:
    cfg = compose_config(*overrides)
    return instantiate(
        cfg.task,
        build_network=instantiate(cfg.model),
        build_optimizer=instantiate(cfg.optim.optimizer),
        warmup_steps=cfg.optim.warmup_steps,
    )


def test_default_config_is_a_30_layer_xavier_relu_mlp_on_digits_with_the_full_suite():
    cfg = compose_config()
    assert cfg.task._target_ == "examples.tasks.digits.DigitsTask"
    assert (cfg.model.depth, cfg.model.activation, cfg.model.init) == (30, "relu", "xavier")
    assert set(cfg.gradstab) == {"monitor", "guard", "init_audit", "advisor"}
    assert (cfg.trainer.accelerator, cfg.trainer.devices) == ("cpu", 1)
    assert cfg.logger._target_.endswith("TensorBoardLogger")


def test_typo_in_a_model_key_is_refused_at_composition_naming_the_key():
    with pytest.raises(ConfigCompositionException) as error:
        compose_config("model.depht=3")
    assert "depht" in str(error.value)


@pytest.mark.parametrize(
    ("override", "key", "expected_type"),
    [
        ("model.depth=deep", "depth", "Integer"),
        ("trainer.max_epochs=1.5", "max_epochs", "Integer"),
        ("optim.optimizer.lr=fast", "lr", "Float"),
        ("model.residual=maybe", "residual", "bool"),
        ("seed=abc", "seed", "Integer"),
    ],
)
def test_wrong_type_is_refused_at_composition_naming_key_and_type(override, key, expected_type):
    with pytest.raises((ConfigCompositionException, ValidationError)) as error:
        compose_config(override)
    message = str(error.value) + str(error.value.__cause__)
    assert key in message
    assert expected_type in message


def test_typo_on_the_command_line_fails_before_training_with_a_clear_message(tmp_path):
    completed = subprocess.run(
        [sys.executable, str(REPO / "examples" / "train.py"), "model.depht=3", f"hydra.run.dir={tmp_path}/run"],
        cwd=tmp_path,
        env=child_env(HYDRA_FULL_ERROR="0"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode != 0
    assert "Could not override 'model.depht'" in completed.stderr
    assert "Key 'depht' not in 'StackSchema'" in completed.stderr
    assert not (tmp_path / "run" / "summary.json").exists()  # nothing ran


def _sweep_combinations(preset: str) -> list[list[str]]:
    cfg = compose_config(f"experiment={preset}", return_hydra_config=True)
    params = cfg.hydra.sweeper.params or {}
    axes = [[f"{key}={value.strip()}" for value in str(values).split(",")] for key, values in params.items()]
    return [list(combination) for combination in itertools.product(*axes)]


@pytest.mark.parametrize("preset", PRESETS)
def test_every_job_of_every_preset_sweep_composes_and_validates(preset):
    combinations = _sweep_combinations(preset)
    assert len(combinations) >= 2, "a preset compares at least two configurations"
    for combination in combinations:
        cfg = compose_config(f"experiment={preset}", *combination)
        assert cfg.name == preset
        OmegaConf.to_container(cfg, resolve=False, throw_on_missing=True)


def test_presets_cover_the_six_published_experiments():
    assert PRESETS == ["glorot2010", "he2015", "lm_spike", "pascanu2013", "resnet2016", "wortsman2023"]


@pytest.mark.parametrize(
    ("trainer", "accelerator", "strategy"),
    [("cpu", "cpu", "auto"), ("gpu", "gpu", "auto"), ("ddp", "gpu", "ddp"), ("ddp_cpu", "cpu", "ddp_spawn")],
)
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_trainer_configs_compose_with_every_precision(trainer, accelerator, strategy, precision):
    cfg = compose_config(f"trainer={trainer}", f"trainer.precision={precision}")
    trainer_args = OmegaConf.to_object(cfg.trainer)
    assert isinstance(trainer_args, TrainerSchema)
    assert (trainer_args.accelerator, trainer_args.strategy, trainer_args.precision) == (
        accelerator,
        strategy,
        precision,
    )


def test_ddp_cpu_uses_two_spawned_gloo_processes_so_multirun_jobs_do_not_rerun_the_sweep():
    cfg = compose_config("trainer=ddp_cpu")
    assert (cfg.trainer.devices, cfg.trainer.strategy) == (2, "ddp_spawn")


def test_fsdp_config_builds_lightnings_fsdp_strategy_with_original_parameters():
    from lightning.pytorch.strategies import FSDPStrategy

    cfg = compose_config("trainer=fsdp")
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["use_orig_params"] is True
    assert cfg.trainer.accelerator == "gpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="trainer=gpu needs a CUDA device")
def test_gpu_trainer_config_builds_a_cuda_trainer():
    cfg = compose_config("trainer=gpu")
    trainer = instantiate(cfg.trainer)
    assert trainer.strategy.root_device.type == "cuda"


def test_local_parallel_launcher_config_selects_joblib_with_two_workers():
    cfg = compose_config("hydra/launcher=local_parallel", return_hydra_config=True)
    assert cfg.hydra.launcher._target_ == "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    assert cfg.hydra.launcher.n_jobs == 2


@pytest.mark.parametrize(
    ("overrides", "batch_size", "logit_shape"),
    [
        (["task=digits", "model=mlp", "model.depth=4"], 8, (8, 10)),
        (["task=digits", "model=cnn", "model.depth=3", "model.residual=true"], 8, (8, 10)),
        (["task=rnn", "model=rnn", "task.seq_len=20", "task.num_train_sequences=16"], 4, (4, 4)),
        (["task=rnn", "model=rnn", "model.cell=lstm", "task.problem=adding", "task.seq_len=20"], 4, (4, 1)),
        (["task=lm", "model=gpt", "model.num_layers=1", "model.pre_ln=false", "task.max_chars=5000"], 2, (2, 64)),
    ],
)
def test_each_task_builds_its_network_and_a_first_loss_near_chance(overrides, batch_size, logit_shape):
    torch.manual_seed(0)
    task = build_task(*overrides, f"task.batch_size={batch_size}")
    batch = next(iter(task.train_dataloader()))
    outputs = task.network(batch[0])
    assert tuple(outputs.shape[: len(logit_shape)]) == logit_shape
    loss, correct = task.loss_and_correct(batch)
    assert torch.isfinite(loss)
    assert correct.dtype == torch.bool


def test_a_model_that_does_not_fit_the_task_fails_at_build_naming_both():
    with pytest.raises(InstantiationException, match=r"'RecurrentNet' does not fit task 'digits'") as error:
        build_task("task=digits", "model=rnn")
    assert isinstance(error.value.__cause__, TypeError)


def test_an_unknown_activation_fails_at_build_naming_the_argument_and_the_choices():
    with pytest.raises(InstantiationException, match=r"`activation` must be one of \['relu'") as error:
        build_task("model.activation=swish", "model.depth=3")
    assert isinstance(error.value.__cause__, ValueError)


def _run_without_torch(tmp_path, *arguments: str) -> subprocess.CompletedProcess:
    """``examples/train.py`` with a ``torch`` that refuses to import: an answer proves nothing heavy loaded."""
    fake = tmp_path / "fake_site" / "torch"
    fake.mkdir(parents=True, exist_ok=True)
    (fake / "__init__.py").write_text("raise ImportError('torch imported before the config was checked')\n")
    env = child_env(prepend=[fake.parent], HYDRA_FULL_ERROR="0")  # the fake torch shadows the installed one
    return subprocess.run(
        [sys.executable, str(REPO / "examples" / "train.py"), *arguments, f"hydra.run.dir={tmp_path}/run"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+gradstab.guard.max_rng=skip",
         "gradstab.guard (ExplosionGuard) has no option 'max_rng'; did you mean 'max_rung'? (options: max_rung, "),
        ("gradstab.init_audit.fixx=true", "gradstab.init_audit (InitAudit) has no option 'fixx'; did you mean 'fix'?"),
        ("gradstab.gard.max_rung=skip", "the suite has no entry 'gard'; did you mean 'guard'?"),
        ("model.init=hee", "'model.init' has no choice 'hee'; did you mean 'he'? (choices: xavier, he, standard, "),
        ("task=mnist", "config group 'task' has no option 'mnist' (options: digits, lm, rnn)"),
        ("model=mpl", "config group 'model' has no option 'mpl'; did you mean 'mlp'?"),
    ],
)
def test_a_typo_fails_in_one_line_naming_the_key_or_group_with_a_suggestion_before_torch_loads(
    tmp_path, override, message
):
    completed = _run_without_torch(tmp_path, override)
    assert completed.returncode == 2 and completed.stdout == ""
    assert completed.stderr.splitlines() == [completed.stderr.strip()], "one line"
    assert completed.stderr.startswith(f"examples/train.py: {override}: {message}")


def test_help_lists_the_groups_a_user_chooses_not_the_stored_schemas(tmp_path):
    completed = _run_without_torch(tmp_path, "--help")
    groups = completed.stdout.split("== Configuration groups ==")[1].split("== Config ==")[0]
    assert "model: cnn, gpt, mlp, rnn" in groups and "gradstab: advisor, full, monitor, off" in groups
    assert "schema/" not in completed.stdout


@pytest.mark.parametrize("name", ["GradNormMonitor", "ExplosionGuard", "InitAudit", "ArchitectureAdvisor"])
def test_the_options_read_from_the_source_are_the_constructors_arguments(name):
    import inspect

    import lightning_gradstab
    from examples.config_check import callback_options

    signature = inspect.signature(getattr(lightning_gradstab, name).__init__)
    named = [p.name for p in signature.parameters.values() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    assert callback_options(f"lightning_gradstab.{name}") == tuple(named)[1:]


def test_the_guards_config_options_read_from_the_source_are_the_policy_config_fields():
    import dataclasses

    from examples.config_check import check_overrides, config_options
    from lightning_gradstab import PolicyConfig

    fields = tuple(field.name for field in dataclasses.fields(PolicyConfig))
    assert config_options("lightning_gradstab.ExplosionGuard") == ("config", "PolicyConfig", fields)
    assert check_overrides(["+gradstab.guard.config.growth_factor=3"], CONF) is None
    assert check_overrides(["+gradstab.guard.growth_factor=3"], CONF) is None  # deprecated, still accepted
    problem = check_overrides(["+gradstab.guard.config.growth_factr=3"], CONF)
    assert problem is not None and problem.startswith(
        "+gradstab.guard.config.growth_factr=3: gradstab.guard.config (PolicyConfig) has no option 'growth_factr'; "
        "did you mean 'growth_factor'?"
    )


def test_the_model_choices_checked_up_front_are_the_ones_the_builders_accept():
    from examples.models import ACTIVATIONS
    from examples.schema import MODEL_CHOICES

    assert set(MODEL_CHOICES["activation"]) == set(ACTIVATIONS)
