"""Norms exact under every parallel layout: FSDP2, HSDP, tensor parallelism (plain and SequenceParallel norms),
FSDP1 (full and hybrid sharding), Lightning's ModelParallelStrategy (2, 2), (4, 1) and (4, 1) sharded HSDP-style
on a 2 x 2 replicate x shard mesh; DeepSpeed refused.

The layouts run in one launch of 4 CPU processes (``tests/scripts/parallel_norms.py``, float64) against a
one-process reference of the same model and batches.
"""

from __future__ import annotations

import json
import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch

from tests.helpers.subprocess_env import REPO, child_env

RTOL = 1e-6
RAW_LAYOUTS = ("fsdp2", "hsdp", "tp", "tp_sequence_parallel", "fsdp1", "fsdp1_hybrid")
FITS = ("model_parallel_2x2", "model_parallel_4x1", "model_parallel_hsdp_2x2")
GUARD_DECISIONS = ("gradstab/clipped", "gradstab/skipped", "gradstab/level", "gradstab/lr_scale")


@pytest.fixture(scope="module")
def parallel_run(tmp_path_factory) -> tuple[dict, list[dict]]:
    """``(reference, [rank0, rank1, rank2, rank3])`` of one 4-process launch (about 50 s on 2 cores)."""
    out = tmp_path_factory.mktemp("parallel")
    done = subprocess.run(
        [sys.executable, str(REPO / "tests/scripts/parallel_norms.py"), str(out)],
        env=child_env(TEST_PORT="29543", PL_DISABLE_FORK="1"),
        cwd=str(out),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stderr[-6000:]
    reference = json.loads((out / "reference.json").read_text())
    return reference, [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(4)]


def _per_step(metrics: dict, key: str) -> list[float]:
    return [value for _, value in sorted(metrics[key])]


@pytest.mark.ddp
@pytest.mark.timeout(420)
@pytest.mark.parametrize("layout", RAW_LAYOUTS)
def test_every_reduction_equals_the_one_process_reference_on_every_rank(parallel_run, layout):
    reference, ranks = parallel_run
    expected = reference["raw"]  # L2, L1, max, weight and update norms per module, totals, non-finite count
    assert {"l2/ln", "l1/fc2", "max/fc1", "weight/ln", "update/fc2", "nonfinite"} <= set(expected)
    for rank, results in enumerate(ranks):
        measured = results[layout]
        for key, value in expected.items():
            assert measured[key] == pytest.approx(value, rel=RTOL, abs=1e-300), (layout, rank, key)
        # the independent computation (full gradients gathered) agrees too
        assert measured["gathered"] == pytest.approx(expected["total"], rel=RTOL), (layout, rank)


@pytest.mark.ddp
@pytest.mark.timeout(420)
def test_a_nan_in_one_shard_of_one_replica_is_counted_once_on_every_rank(parallel_run):
    _, ranks = parallel_run
    for results in ranks:
        assert results["hsdp_nan_on_rank_1"] == {"ln": 0.0, "fc1": 1.0, "fc2": 0.0}


@pytest.mark.ddp
@pytest.mark.timeout(420)
def test_sequence_parallel_layernorm_gradients_are_partial_and_still_counted_exactly(parallel_run):
    _, ranks = parallel_run
    assert all(results["tp_sequence_parallel"]["ln_grads_partial"] == 1.0 for results in ranks)


@pytest.mark.ddp
@pytest.mark.timeout(420)
@pytest.mark.parametrize("fit", FITS)
def test_model_parallel_strategy_logs_the_one_process_norms_on_every_step(parallel_run, fit):
    reference, ranks = parallel_run
    expected, logged = reference["fit"]["metrics"], ranks[0][fit]["metrics"]
    norm_tags = [tag for tag in expected if tag.startswith("gradstab/grad_norm/")]
    assert {"gradstab/grad_norm/total", "gradstab/grad_norm/net.ln", "gradstab/grad_norm/net.fc2"} <= set(norm_tags)
    for tag in norm_tags:
        # the monitor hands loggers float32 scalars: compared at float32 resolution, well inside 1e-6
        assert _per_step(logged, tag) == pytest.approx(_per_step(expected, tag), rel=RTOL), tag
    assert len(_per_step(logged, "gradstab/grad_norm/total")) == 6


@pytest.mark.ddp
@pytest.mark.timeout(420)
@pytest.mark.parametrize("fit", FITS)
def test_guard_decides_as_in_one_process_on_a_healthy_adam_model(parallel_run, fit):
    reference, ranks = parallel_run
    expected, logged = reference["fit"]["metrics"], ranks[0][fit]["metrics"]
    for tag in GUARD_DECISIONS:
        assert _per_step(logged, tag) == _per_step(expected, tag), tag
    assert max(_per_step(expected, "gradstab/grad_norm/total")) > 0.9  # close to the Adam ceiling (1.0) ...
    assert sum(_per_step(expected, "gradstab/clipped")) == 0  # ... and under it: healthy, nothing to do
    # FSDP2's unshard and reshard and TP's redistribution write no weight the optimizer holds: no outside write
    assert [results[fit]["weights_changed"] for results in ranks] == [0] * len(ranks)
    for rank, results in enumerate(ranks):  # the same updates: weights gathered whole equal the reference
        for name, weight in results[fit]["weights"].items():
            torch.testing.assert_close(
                torch.tensor(weight), torch.tensor(reference["fit"]["weights"][name]), rtol=1e-9, atol=1e-12
            ), (fit, rank, name)


@pytest.mark.ddp
@pytest.mark.timeout(420)
@pytest.mark.parametrize("fit", FITS)
def test_self_check_agrees_with_the_gathered_norm_and_stays_silent(parallel_run, fit):
    reference, ranks = parallel_run
    for results in ranks:
        suite, gathered = results[fit]["self_check"]
        assert suite == pytest.approx(gathered, rel=1e-12)
        first_total = _per_step(reference["fit"]["metrics"], "gradstab/grad_norm/total")[0]
        assert gathered == pytest.approx(first_total, rel=RTOL)
    assert ranks[0][fit]["warnings"] == []


@pytest.mark.ddp
@pytest.mark.timeout(420)
@pytest.mark.parametrize("fit", ("model_parallel_2x2", "model_parallel_hsdp_2x2"))
def test_counting_replicas_once_per_copy_is_caught_by_the_self_check_and_changes_decisions(parallel_run, fit):
    """The bug these layouts had (every replica count 1): the comparison and the self-check both see it."""
    reference, ranks = parallel_run
    broken, expected = ranks[0][f"{fit}_replicas_ignored"], reference["fit"]["metrics"]
    totals = _per_step(broken["metrics"], "gradstab/grad_norm/total")
    true_totals = _per_step(expected, "gradstab/grad_norm/total")
    assert all(total > 1.03 * true for total, true in zip(totals, true_totals, strict=True))
    suite, gathered = broken["self_check"]
    assert gathered == pytest.approx(true_totals[0], rel=RTOL) and suite > 1.03 * gathered
    assert len(broken["warnings"]) == 1
    assert f"{suite:.9g}" in broken["warnings"][0] and f"{gathered:.9g}" in broken["warnings"][0]
    assert sum(_per_step(broken["metrics"], "gradstab/clipped")) > 0  # healthy steps clipped: the wrong norm acts


@pytest.mark.ddp
@pytest.mark.timeout(420)
def test_rank_local_parameters_are_refused_with_a_message_naming_them(parallel_run):
    _, ranks = parallel_run
    for results in ranks:
        refusal = results["rank_local_plain"]["error"]
        assert "expert parallelism" in refusal and "'expert.weight'" in refusal
        assert "different numbers of trainable parameters" in results["rank_local_count"]["error"]


class _Trainer:
    """The few trainer attributes the suite reads before a fit starts (weak-referenceable, as a trainer is)."""

    def __init__(self, strategy: object) -> None:
        self.strategy, self.log_every_n_steps, self.loggers, self.global_step = strategy, 50, [], 0
        self.fit_loop = type("FitLoop", (), {"total_batch_idx": 0})()


class _DeepSpeedStandIn:
    """A ``DeepSpeedStrategy`` instance without DeepSpeed installed: the class exists in Lightning, only its
    constructor needs the package. Detection is by type, so this is what the callbacks see."""

    @staticmethod
    def make():
        from lightning.pytorch.strategies import DeepSpeedStrategy

        return object.__new__(type("ConfiguredDeepSpeed", (DeepSpeedStrategy,), {}))


def test_deepspeed_is_refused_at_setup_with_the_alternative_named():
    from lightning_gradstab import ExplosionGuard, GradNormMonitor

    trainer = _Trainer(_DeepSpeedStandIn.make())
    with pytest.raises(ValueError, match=r"GradNormMonitor: strategy=ConfiguredDeepSpeed is not supported") as error:
        GradNormMonitor().setup(trainer, None, "fit")
    assert "p.grad" in str(error.value) and "strategy='fsdp'" in str(error.value)
    assert "ModelParallelStrategy" in str(error.value) and "get_global_grad_norm" in str(error.value)
    with pytest.raises(ValueError, match=r"ExplosionGuard: strategy=ConfiguredDeepSpeed is not supported"):
        ExplosionGuard().on_fit_start(trainer, None)


def test_deepspeed_never_yields_a_silent_zero_norm_even_without_a_setup_check():
    """Any suite callback (the advisor, say) that asks for statistics under DeepSpeed is refused too."""
    from lightning_gradstab.callbacks._shared import gradient_stats
    from tests.helpers.models import TinyRegressor

    module = TinyRegressor()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    for parameter in module.parameters():
        parameter.grad = None  # where DeepSpeed leaves them: its own buffers hold the gradients
    with pytest.raises(ValueError, match="DeepSpeed keeps the gradients in its own buffers"):
        gradient_stats(_Trainer(_DeepSpeedStandIn.make()), module, optimizer)


def test_sharded_strategies_are_recognised_by_type_not_by_name():
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy

    from lightning_gradstab.distributed import strategy_kind

    renamed_model_parallel = type("MyTrainingStrategy", (ModelParallelStrategy,), {})
    renamed_fsdp = type("Sharded", (FSDPStrategy,), {})
    assert strategy_kind(object.__new__(renamed_model_parallel)) == "model_parallel"
    assert strategy_kind(object.__new__(renamed_fsdp)) == "fsdp"
    assert strategy_kind(object.__new__(type("FSDPStrategy", (DDPStrategy,), {}))) == "replicated"  # name alone: no
    assert strategy_kind(_DeepSpeedStandIn.make()) == "deepspeed"


def test_self_check_option_is_validated():
    from lightning_gradstab import GradNormMonitor

    with pytest.raises(TypeError, match=r"`self_check` must be a bool, got 'yes'"):
        GradNormMonitor(self_check="yes")


def test_self_check_on_one_device_agrees_with_a_float64_norm_of_the_first_step(recwarn):
    from lightning_gradstab import GradNormMonitor
    from tests.helpers.models import TinyRegressor
    from tests.helpers.trainers import quiet_trainer

    monitor = GradNormMonitor(self_check=True, heatmap_every_n_steps=None)
    model = TinyRegressor()
    first_step_norms = []

    class FirstStepReference(pl.Callback):  # float64 norm of the gradients the suite measured on step 0
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 0:
                grads = [p.grad.double().flatten() for p in pl_module.parameters() if p.grad is not None]
                first_step_norms.append(float(torch.cat(grads).norm()))

    quiet_trainer(max_steps=3, callbacks=[FirstStepReference(), monitor]).fit(model)
    suite, gathered = monitor.self_check_results[0]
    assert gathered == pytest.approx(first_step_norms[0], rel=1e-12)
    assert suite == pytest.approx(gathered, rel=1e-6)  # float32 statistics of a float32 model
    assert not [w for w in recwarn if "self-check" in str(w.message)]
