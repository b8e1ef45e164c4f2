"""Under 2-process DDP both ranks see the same all-reduced norms and only rank 0 writes them."""

import pytest

pytestmark = [pytest.mark.ddp, pytest.mark.timeout(300)]


def test_ddp_ranks_measure_identical_global_norms_and_only_rank_zero_logs(tmp_path, ddp_runner):
    rank0, rank1 = ddp_runner("monitor_ddp.py", tmp_path)
    assert len(rank0["rows"]) == len(rank1["rows"]) == 4
    for row0, row1 in zip(rank0["rows"], rank1["rows"], strict=True):
        assert row0["shared"] == row1["shared"]  # grads are all-reduced before the hook
        assert row0["shared"] == pytest.approx(row0["reference"], rel=1e-5)
    logged = dict((step, value) for step, value in rank0["logged"]["gradstab/grad_norm/total"])
    assert logged == {row["step"]: pytest.approx(row["shared"], rel=1e-6) for row in rank0["rows"]}
    for group, expected in rank0["rows"][2]["groups"].items():
        assert dict(rank0["logged"][f"gradstab/grad_norm/{group}"])[2] == pytest.approx(expected, rel=1e-5)
    assert not any(key.startswith("gradstab/") for key in rank1["logged"])
