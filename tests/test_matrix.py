"""Compatibility matrix: the suite on every Lightning set-up a user has, against the same run without it.

Every cell trains :class:`~tests.matrix_support.MatrixModel` for 8 optimizer steps, once without the suite and
once with it, and checks that (1) the suite took no action (the guard neither clipped nor skipped, the
audit re-initialised nothing), (2) the final weights are therefore ``torch.equal`` to the run without the
suite, (3) what the model logged is unchanged and (4) the monitor logged, for every optimizer step, the
float64 reference norm of the gradients the optimizer used.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_gradstab import ArchitectureAdvisor, ExplosionGuard, GradNormMonitor, InitAudit
from tests.matrix_support import (
    SUITE_MEMBERS,
    Cell,
    CellRun,
    assert_bit_identical,
    build_model,
    full_suite,
    guard_actions,
    run_cell,
    trainer_for,
    user_metrics,
)

torch.set_num_threads(1)

AXES = [
    Cell("automatic"),
    Cell("manual", {"manual": True}),
    Cell("manual_two_optimizers", {"manual": True, "two_optimizers": True}),
    Cell("accumulate_4", trainer={"accumulate_grad_batches": 4}),
    Cell("bf16_mixed", trainer={"precision": "bf16-mixed"}),
    Cell("accumulate_4_bf16_mixed", trainer={"accumulate_grad_batches": 4, "precision": "bf16-mixed"}),
    Cell("fp16_mixed_grad_scaler_cpu", fp16_scaler=True),
    Cell("compiled", {"compile_backend": "aot_eager"}),
    Cell("compiled_lightning_module", {"log_in_training_step": False}, compile_module="aot_eager"),
    Cell("frozen_submodule", {"frozen": True}),
    Cell("tied_weights", {"tied": True}),
    Cell("sparse_embedding", {"sparse_embedding": True}),
    Cell("parameterless_submodule", {"parameterless": True}),
    Cell("scheduler_per_step", {"scheduler": "step"}),
    Cell("scheduler_per_epoch", {"scheduler": "epoch"}),
    Cell("manual_two_optimizers_schedulers", {"manual": True, "two_optimizers": True, "scheduler": "step"}),
    Cell("trainer_gradient_clip", trainer={"gradient_clip_val": 1.0}),
]
CELLS = {cell.name: cell for cell in AXES}
SLOW_CELLS = {"compiled"}  # InitAudit's probe recompiles the compiled networks: ~15 s on 2 cores
AXIS_PARAMS = [
    pytest.param(cell, id=cell.name, marks=[pytest.mark.slow] if cell.name in SLOW_CELLS else []) for cell in AXES
]


@pytest.fixture(scope="module")
def without_suite(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Cell], CellRun]:
    """The run of a cell without the suite, trained once per module and shared by every test comparing to it."""
    runs: dict[str, CellRun] = {}

    def run(cell: Cell) -> CellRun:
        key = repr(cell)  # every option, so a cell changed by ``with_trainer`` gets its own run
        if key not in runs:
            runs[key] = run_cell(cell, tmp_path_factory.mktemp(f"{cell.name}_without_suite"), [])
        return runs[key]

    return run


def _monitor_totals(run: CellRun) -> dict[int, list[tuple[int, float]]]:
    """The monitor's logged total norms per optimizer, in the reference's layout."""
    metrics = run.logger.metrics
    if "gradstab/grad_norm/total" in metrics:
        return {0: metrics["gradstab/grad_norm/total"]}
    return {
        index: metrics[f"gradstab/grad_norm/opt{index}/total"] for index in range(len(run.trainer.optimizers))
    }


def _assert_logged_norms_match_reference(run: CellRun) -> None:
    logged, reference = _monitor_totals(run), dict(run.reference.total_norms)
    assert logged.keys() == reference.keys()
    for index, expected in reference.items():
        assert [step for step, _ in logged[index]] == [step for step, _ in expected]
        for (_, value), (_, norm) in zip(logged[index], expected, strict=True):
            assert value == pytest.approx(norm, rel=1e-5, nan_ok=True)


def _assert_nonfinite_logged_exactly_where_the_reference_is_nonfinite(run: CellRun) -> None:
    """Zero everywhere in fp32/bf16; under an fp16 scaler, the overflow steps the scaler itself skips."""
    for index, expected in run.reference.total_norms.items():
        scope = "" if len(run.trainer.optimizers) == 1 else f"opt{index}/"
        logged = run.logger.metrics[f"gradstab/nonfinite/{scope}count"]
        assert [step for step, count in logged if count > 0] == [step for step, n in expected if not math.isfinite(n)]


def _assert_took_no_action(callbacks: list[Callback]) -> None:
    for callback in callbacks:
        if isinstance(callback, ExplosionGuard):
            assert callback.policies, "the guard never saw an optimizer step"
            assert guard_actions(callback) == {}
            assert callback.stop_reason is None
            # nothing but the optimizers wrote the weights (AMP, compile, accumulation, tied and sparse weights)
            assert not any("weights_changed" in policy.counts for policy in callback.policies.values())
        if isinstance(callback, InitAudit):
            assert callback.report is not None
            assert callback.fixed_modules == []
        if isinstance(callback, ArchitectureAdvisor):
            assert callback.report is not None


@pytest.mark.parametrize("cell", AXIS_PARAMS)
def test_full_suite_takes_no_action_and_leaves_training_bit_identical(
    cell: Cell, tmp_path: Path, without_suite: Callable[[Cell], CellRun]
) -> None:
    reference = without_suite(cell)
    run = run_cell(cell, tmp_path, full_suite())
    assert run.trainer.global_step == reference.trainer.global_step > 0
    _assert_took_no_action(run.callbacks)
    assert_bit_identical(run.weights, reference.weights)
    assert user_metrics(run.logger) == user_metrics(reference.logger)
    _assert_logged_norms_match_reference(run)
    _assert_nonfinite_logged_exactly_where_the_reference_is_nonfinite(run)


ALONE = [(CELLS["automatic"], name) for name in SUITE_MEMBERS] + [
    (CELLS["compiled"], "ExplosionGuard"),
    (CELLS["compiled_lightning_module"], "ExplosionGuard"),
    (CELLS["manual_two_optimizers"], "ExplosionGuard"),
    (CELLS["manual_two_optimizers"], "ArchitectureAdvisor"),
    (CELLS["accumulate_4_bf16_mixed"], "GradNormMonitor"),
    (CELLS["accumulate_4_bf16_mixed"], "ExplosionGuard"),
    (CELLS["sparse_embedding"], "GradNormMonitor"),
    (CELLS["tied_weights"], "InitAudit"),
]


@pytest.mark.parametrize(("cell", "member"), ALONE, ids=[f"{cell.name}-{member}" for cell, member in ALONE])
def test_each_callback_alone_leaves_training_bit_identical(
    cell: Cell, member: str, tmp_path: Path, without_suite: Callable[[Cell], CellRun]
) -> None:
    reference = without_suite(cell)
    run = run_cell(cell, tmp_path, [SUITE_MEMBERS[member]()])
    _assert_took_no_action(run.callbacks)
    assert_bit_identical(run.weights, reference.weights)
    assert user_metrics(run.logger) == user_metrics(reference.logger)
    if member == "GradNormMonitor":
        _assert_logged_norms_match_reference(run)


ARMED = ["automatic", "manual_two_optimizers", "accumulate_4_bf16_mixed", "fp16_mixed_grad_scaler_cpu"]


@pytest.mark.parametrize("name", ARMED)
def test_full_suite_past_the_guards_warmup_judges_100_healthy_steps_and_stays_bit_identical(
    name: str, tmp_path: Path, without_suite: Callable[[Cell], CellRun]
) -> None:
    """8 steps never leave the guard's 25-step warm-up; 100 steps arm its clipping and the advisor's window."""
    cell = CELLS[name].with_trainer(max_steps=100)
    reference = without_suite(cell)
    run = run_cell(cell, tmp_path, full_suite())
    guard = next(c for c in run.callbacks if isinstance(c, ExplosionGuard))
    assert all(policy.statistics.warmed_up for policy in guard.policies.values())
    _assert_took_no_action(run.callbacks)
    assert_bit_identical(run.weights, reference.weights)
    _assert_logged_norms_match_reference(run)


@pytest.mark.parametrize("cell", [CELLS["automatic"], CELLS["manual_two_optimizers"]], ids=lambda cell: cell.name)
def test_monitor_with_every_option_on_is_still_bit_identical(
    cell: Cell, tmp_path: Path, without_suite: Callable[[Cell], CellRun]
) -> None:
    """Update-to-weight copies weights around the step and hooks the optimizer: it must only read them."""
    reference = without_suite(cell)
    monitor = GradNormMonitor(group_by="parameter", norm_type=1.0, log_inf_norm=True, update_to_weight=True)
    run = run_cell(cell, tmp_path, [monitor])
    assert_bit_identical(run.weights, reference.weights)
    ratios = [value for key, values in run.logger.metrics.items() if "update_to_weight" in key for _, value in values]
    assert ratios and all(math.isfinite(ratio) and ratio > 0 for ratio in ratios)


def test_compiled_model_trains_without_extra_graphs_from_the_per_step_callbacks(tmp_path: Path) -> None:
    """Monitor and guard read the statistics in a hook outside the compiled graph: no recompiles."""
    from torch._dynamo.utils import counters

    cell = CELLS["compiled"]
    graphs = {}
    for name, callbacks in [("without", []), ("with", [GradNormMonitor(), ExplosionGuard(console_summary=False)])]:
        torch._dynamo.reset()
        counters.clear()
        run_cell(cell, tmp_path / name, callbacks)
        graphs[name] = counters["stats"]["unique_graphs"]
    assert graphs["with"] == graphs["without"] > 0


@pytest.mark.slow
def test_inductor_compiled_model_with_full_suite_is_bit_identical(
    tmp_path: Path, without_suite: Callable[[Cell], CellRun]
) -> None:
    cell = Cell("inductor", {"compile_backend": "inductor"})
    reference = without_suite(cell)
    run = run_cell(cell, tmp_path, full_suite())
    _assert_took_no_action(run.callbacks)
    assert_bit_identical(run.weights, reference.weights)
    _assert_logged_norms_match_reference(run)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="16-mixed (fp16 + GradScaler) needs a CUDA device")
def test_fp16_mixed_on_gpu_is_bit_identical_and_logs_unscaled_norms(
    tmp_path: Path, without_suite: Callable[[Cell], CellRun]
) -> None:
    cell = Cell("fp16_mixed_gpu", trainer={"accelerator": "gpu", "precision": "16-mixed"})
    reference = without_suite(cell)
    run = run_cell(cell, tmp_path, full_suite())
    guard = next(c for c in run.callbacks if isinstance(c, ExplosionGuard))
    assert guard_actions(guard) == {}
    assert_bit_identical(run.weights, reference.weights)
    _assert_logged_norms_match_reference(run)  # the reference reads the unscaled grads in the same hook


def test_fast_dev_run_runs_one_step_with_the_suite_and_is_bit_identical(
    tmp_path: Path, without_suite: Callable[[Cell], CellRun]
) -> None:
    cell = Cell("fast_dev_run", trainer={"fast_dev_run": True})
    reference = without_suite(cell)
    run = run_cell(cell, tmp_path, full_suite())
    guard = next(c for c in run.callbacks if isinstance(c, ExplosionGuard))
    assert run.trainer.global_step == 1
    assert guard.policy(0).state.steps == 1
    _assert_took_no_action(run.callbacks)
    assert_bit_identical(run.weights, reference.weights)


@pytest.mark.parametrize("entry_point", ["validate", "test"])
def test_validate_and_test_calls_leave_model_metrics_and_disk_untouched(entry_point: str, tmp_path: Path) -> None:
    results = {}
    for name, callbacks in [("without", []), ("with", full_suite())]:
        model = build_model(CELLS["automatic"])
        initial = {key: value.clone() for key, value in model.state_dict().items()}
        trainer = trainer_for(CELLS["automatic"], tmp_path / name, callbacks, logger=False)
        results[name] = getattr(trainer, entry_point)(model, verbose=False)
        assert_bit_identical(model.state_dict(), initial)
        if callbacks:
            _, guard, audit, advisor = callbacks
            assert guard.policies == {} and audit.report is None and advisor.report is None
            assert not list((tmp_path / name).rglob("gradstab_*"))  # no report or event file for a non-fit run
    assert results["with"] == results["without"]
    assert all(math.isfinite(value) for value in results["with"][0].values())


def test_checkpoint_resume_mid_epoch_is_bit_identical_and_continues_the_suite_state(tmp_path: Path) -> None:
    """Stop after 3 of the epoch's 4 batches, save, resume to 8 steps in a new trainer; with and without suite."""
    cell = CELLS["automatic"]
    finals, suites = {}, {}
    for name, make_callbacks in [("without", list), ("with", full_suite)]:
        first = run_cell(cell.with_trainer(max_steps=3), tmp_path / name / "first", make_callbacks())
        checkpoint = tmp_path / name / "mid_epoch.ckpt"
        first.trainer.save_checkpoint(checkpoint)
        suites[name] = make_callbacks()
        resumed = run_cell(cell, tmp_path / name / "resumed", suites[name], ckpt_path=str(checkpoint))
        assert resumed.trainer.global_step == 8
        finals[name] = resumed
    assert_bit_identical(finals["with"].weights, finals["without"].weights)
    assert user_metrics(finals["with"].logger) == user_metrics(finals["without"].logger)
    _, guard, audit, advisor = suites["with"]
    assert guard.policy(0).state.steps == 8  # the guard's statistics continued from the checkpoint
    assert guard_actions(guard) == {}
    assert audit.report is None  # audited before the checkpoint: a resumed run is never re-audited
    assert advisor.report is not None  # the window's losses and norms came back with the checkpoint
    _assert_logged_norms_match_reference(finals["with"])


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.timeout(300)
def test_two_process_ddp_with_full_suite_is_bit_identical_on_both_ranks_and_to_ddp_without_it(
    tmp_path: Path, ddp_runner
) -> None:
    runs = {}
    for mode in ("without_suite", "full_suite"):
        (tmp_path / mode).mkdir()
        runs[mode] = ddp_runner("matrix_ddp.py", tmp_path / mode, mode, timeout=240)
    for rank0, rank1 in runs.values():
        assert rank0["global_step"] == rank1["global_step"] == 8
        assert rank0["weights"] == rank1["weights"]
    assert runs["full_suite"][0]["weights"] == runs["without_suite"][0]["weights"]
    suite_rank0, suite_rank1 = runs["full_suite"]
    assert suite_rank0["guard_actions"] == suite_rank1["guard_actions"] == {}
    assert suite_rank0["guard_steps"] == suite_rank1["guard_steps"] == 8
    totals = suite_rank0["logged_total_norms"]  # rank 0 logs; the reference is rank 0's all-reduced gradient
    assert [step for step, _ in totals] == [step for step, _ in suite_rank0["reference_total_norms"]]
    for (_, value), (_, norm) in zip(totals, suite_rank0["reference_total_norms"], strict=True):
        assert value == pytest.approx(norm, rel=1e-5)
    assert suite_rank1["logged_total_norms"] == []  # only global rank 0 writes to loggers
