"""ExplosionGuard under a real 2-process CPU DDP job: one rank's NaN, one decision everywhere, no hang."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.scripts.guard_nan_ddp import NAN_GRAD_STEP, NAN_LOSS_STEP, STEPS
from tests.scripts.guard_repeat_ddp import SPIKE_STEPS
from tests.scripts.guard_repeat_ddp import STEPS as REPEAT_STEPS
from tests.scripts.qk_clip_ddp import EDIT_AT
from tests.scripts.qk_clip_ddp import STEPS as QK_STEPS

pytestmark = [pytest.mark.ddp, pytest.mark.timeout(240)]


def test_nan_on_one_rank_skips_the_same_step_on_all_ranks(tmp_path: Path, ddp_runner) -> None:
    rank0, rank1 = ddp_runner("guard_nan_ddp.py", tmp_path, timeout=200)
    assert rank0["global_step"] == rank1["global_step"] == STEPS  # no hang, no early exit
    for rank in (rank0, rank1):
        nonfinite = [(e["step"], e["actions"]) for e in rank["events"] if e["anomaly"] == "nonfinite"]
        assert nonfinite == [(NAN_LOSS_STEP + 1, ["skip"]), (NAN_GRAD_STEP + 1, ["skip"])]
        for step in (NAN_LOSS_STEP, NAN_GRAD_STEP):  # a skipped step leaves the weights as they were
            assert rank["weights"][str(step + 1)] == rank["weights"][str(step)]
    assert rank0["events"] == rank1["events"]
    assert rank0["weights"] == rank1["weights"]  # identical on every step, bit for bit
    assert all(math.isfinite(w) for w in rank0["weights"][str(STEPS)])


def test_fp16_nan_on_one_rank_after_the_all_reduce_is_skipped_on_both_ranks_with_identical_loss_scales(
    tmp_path: Path, ddp_runner
) -> None:
    """Not an fp16 overflow (the scaler's own check ran before it and on one rank): a rank-local fault."""
    rank0, rank1 = ddp_runner("guard_nan_ddp.py", tmp_path, "fp16", timeout=200)
    assert rank0["global_step"] == rank1["global_step"] == STEPS
    for rank in (rank0, rank1):
        by_step = {e["step"]: (e["anomaly"], e["actions"]) for e in rank["events"]}
        assert by_step[NAN_GRAD_STEP + 1] == ("nonfinite", ["skip"])  # skipped on every rank, not left to the scaler
        assert rank["weights"][str(NAN_GRAD_STEP + 1)] == rank["weights"][str(NAN_GRAD_STEP)]
        assert rank["counts"].get("amp_overflow", 0) >= 1  # rank 1's NaN loss reached both ranks: a real overflow
    assert rank0["weights"] == rank1["weights"]  # bit-identical on every step
    assert rank0["loss_scales"] == rank1["loss_scales"]
    assert rank0["loss_scales"][str(NAN_GRAD_STEP + 1)] == rank0["loss_scales"][str(NAN_GRAD_STEP)]  # not halved
    assert all(math.isfinite(w) for w in rank0["weights"][str(STEPS)])


def test_a_batch_that_comes_back_after_its_skip_is_judged_alike_on_every_rank(tmp_path: Path, ddp_runner) -> None:
    """Rank 1's loss spikes on its repeated batch: both ranks skip the first step and learn the repeat."""
    rank0, rank1 = ddp_runner("guard_repeat_ddp.py", tmp_path, timeout=200)
    assert rank0["global_step"] == rank1["global_step"] == REPEAT_STEPS
    for rank in (rank0, rank1):
        assert rank["counts"]["loss_spike"] >= 1 and rank["counts"]["repeated_batch"] >= 1
        first = SPIKE_STEPS[0] + 1  # the policy counts steps from 1
        assert rank["weights"][str(first)] == rank["weights"][str(first - 1)]  # the spike's step was skipped
        assert rank["weights"][str(first + 1)] != rank["weights"][str(first)]  # the repeat was trained on
    assert rank0["events"] == rank1["events"] and rank0["counts"] == rank1["counts"]
    assert rank0["weights"] == rank1["weights"]


def test_attention_logits_are_capped_alike_on_every_rank(tmp_path: Path, ddp_runner) -> None:
    """Each rank measures its own batch's logits; the cap acts on their maximum over ranks, so the weights stay
    bit-identical although the ranks' measurements differ."""
    rank0, rank1 = ddp_runner("qk_clip_ddp.py", tmp_path, timeout=200)
    assert rank0["global_step"] == rank1["global_step"] == QK_STEPS
    assert rank0["counts"]["attention_logit_cap"] >= 3
    assert "weights_changed" not in rank0["counts"]  # the cap's rescaling is the guard's own write
    assert rank0["counts"] == rank1["counts"]
    assert rank0["weights"] == rank1["weights"]


def test_the_relative_update_ceiling_shrinks_the_same_steps_alike_on_every_rank(tmp_path: Path, ddp_runner) -> None:
    """Each rank measures its own copy of the step (no collective: DDP replicas step alike); the schedule follows
    the outcome reduced with the next step's numbers, so both ranks measure, bound and count the same steps."""
    rank0, rank1 = ddp_runner("qk_clip_ddp.py", tmp_path, "ceiling", timeout=200)
    assert rank0["global_step"] == rank1["global_step"] == QK_STEPS
    assert rank0["counts"]["relative_update"] >= 10
    assert "weights_changed" not in rank0["counts"]  # the ceiling's shrinking is the guard's own write
    assert rank0["counts"] == rank1["counts"]
    assert rank0["weights"] == rank1["weights"]


def test_a_weight_written_on_one_rank_only_restarts_the_guard_on_every_rank_at_the_same_step(
    tmp_path: Path, ddp_runner
) -> None:
    """Rank 1 alone halves a weight in place (a user's change): the flag rides the guard's one reduction, so
    both ranks drop their statistics and snapshot at the same step and go on judging alike."""
    rank0, rank1 = ddp_runner("qk_clip_ddp.py", tmp_path, "edit", timeout=200)
    assert rank0["global_step"] == rank1["global_step"] == QK_STEPS
    for rank in (rank0, rank1):
        assert rank["counts"]["weights_changed"] == 1
        assert rank["outside_write_step"] == EDIT_AT  # steps judged before the write
    assert rank0["counts"] == rank1["counts"]
