"""RollbackSnapshot: what a rollback returns to is exactly what was there, within a memory bound."""

from __future__ import annotations

import re
import shutil
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_gradstab.guard import snapshot_budget, snapshot_disk
from lightning_gradstab.guard.snapshot import RollbackSnapshot
from lightning_gradstab.guard.snapshot_budget import default_max_bytes, validate_snapshot_options

torch.set_num_threads(1)


class _Training:
    """A real tiny training: Linear-BatchNorm-Linear, Adam, and a CPU ``GradScaler`` (fp16 loss scaling)."""

    def __init__(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 1))
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-2)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)

    def step(self, overflow: bool = False) -> None:
        self.optimizer.zero_grad()
        loss = self.model(torch.randn(8, 4)).square().mean()
        self.scaler.scale(loss).backward()
        if overflow:  # an fp16 overflow: the scaler skips the step and halves its scale
            self.model[0].weight.grad[0, 0] = float("inf")
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def state(self) -> dict[str, object]:
        """Everything a rollback must bring back, copied."""
        moments = [
            {key: value.clone() for key, value in self.optimizer.state[p].items()} for p in self.model.parameters()
        ]
        weights = {key: value.clone() for key, value in self.model.state_dict().items()}
        return {"weights": weights, "moments": moments, "scaler": self.scaler.state_dict()}


def _identical(a: dict, b: dict) -> bool:
    weights = a["weights"].keys() == b["weights"].keys() and all(
        torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"]
    )
    moments = all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
        for x, y in zip(a["moments"], b["moments"], strict=True)
    )
    return weights and moments and a["scaler"] == b["scaler"]


@pytest.mark.parametrize("location", ["memory", "disk"])
def test_restore_brings_back_weights_buffers_adam_moments_and_loss_scale_bit_identically(
    location: str, tmp_path: Path
) -> None:
    training = _Training()
    for _ in range(3):
        training.step()
    snapshot = RollbackSnapshot(location=location, directory=tmp_path)
    snapshot.take(training.model, [training.optimizer], training.scaler, step=3)
    at_snapshot = training.state()

    training.step()
    training.step(overflow=True)  # the scale is halved after the snapshot
    training.step()
    training.optimizer.param_groups[0]["lr"] = 1e-3  # a scheduler moved on meanwhile
    assert not _identical(training.state(), at_snapshot)

    snapshot.restore(training.model, [training.optimizer], training.scaler)
    assert _identical(training.state(), at_snapshot)
    assert training.scaler.get_scale() == 2.0**13  # grown once after the snapshot, halved, now back
    assert training.optimizer.param_groups[0]["lr"] == 1e-3  # current hyper-parameters are kept
    assert snapshot.step == 3 and snapshot.location == location
    if location == "disk":
        assert snapshot.path.parent == tmp_path and snapshot.path.stat().st_size >= snapshot.state_bytes
        assert snapshot.nbytes == 0  # written: nothing left in host RAM


def test_training_after_a_restore_continues_exactly_like_from_the_snapshot(tmp_path: Path) -> None:
    reference, rolled_back = _Training(), _Training()
    for training in (reference, rolled_back):
        torch.manual_seed(5)
        training.step()
    snapshot = RollbackSnapshot()
    snapshot.take(rolled_back.model, [rolled_back.optimizer], rolled_back.scaler)
    rolled_back.step(overflow=True)
    rolled_back.step()
    snapshot.restore(rolled_back.model, [rolled_back.optimizer], rolled_back.scaler)
    torch.manual_seed(7)
    reference.step()
    torch.manual_seed(7)
    rolled_back.step()  # Adam updates its moments in place: they must not be the snapshot's buffers
    assert _identical(rolled_back.state(), reference.state())
    snapshot.restore(rolled_back.model, [rolled_back.optimizer], rolled_back.scaler)  # the snapshot is intact
    assert not _identical(rolled_back.state(), reference.state())


def test_a_snapshot_travels_in_a_checkpoint_and_restores_after_a_resume(tmp_path: Path) -> None:
    training = _Training()
    training.step()
    snapshot = RollbackSnapshot()
    snapshot.take(training.model, [training.optimizer], training.scaler, step=7)
    at_snapshot = training.state()
    torch.save({"snapshot": snapshot.state_dict()}, tmp_path / "checkpoint.pt")

    resumed = RollbackSnapshot()  # a new process: the state comes back from the file
    resumed.load_state_dict(torch.load(tmp_path / "checkpoint.pt", weights_only=True)["snapshot"])
    training.step(overflow=True)
    training.step()
    resumed.restore(training.model, [training.optimizer], training.scaler)
    assert _identical(training.state(), at_snapshot)
    assert resumed.step == 7 and resumed.nbytes == snapshot.nbytes

    on_disk = RollbackSnapshot(location="disk", directory=tmp_path)
    on_disk.take(training.model, [training.optimizer], step=8)
    empty = RollbackSnapshot()
    empty.load_state_dict(on_disk.state_dict())  # a disk snapshot is not carried: a new one is taken later
    assert not empty.available and empty.step is None


def test_a_refresh_reuses_the_host_buffers_and_holds_three_times_the_weights_with_adam() -> None:
    training = _Training()
    training.step()
    snapshot = RollbackSnapshot()
    snapshot.take(training.model, [training.optimizer])
    buffers = [t.data_ptr() for t in snapshot._host]
    training.step()
    snapshot.take(training.model, [training.optimizer])
    assert [t.data_ptr() for t in snapshot._host] == buffers  # refreshed in place, nothing reallocated
    assert torch.equal(snapshot._host[0], training.model[0].weight.detach())
    parameter_bytes = sum(p.nbytes for p in training.model.parameters())
    buffer_bytes = sum(b.nbytes for b in training.model.buffers())
    step_counters = sum(state["step"].nbytes for state in training.optimizer.state.values())
    assert snapshot.nbytes == 3 * parameter_bytes + buffer_bytes + step_counters


def test_weights_only_keeps_a_third_of_the_bytes_and_leaves_the_optimizer_state_alone() -> None:
    training = _Training()
    training.step()
    snapshot = RollbackSnapshot(keep="weights")
    snapshot.take(training.model, [training.optimizer], training.scaler)
    weights_before = training.state()["weights"]
    training.step()
    moments_now = training.state()["moments"]
    snapshot.restore(training.model, [training.optimizer], training.scaler)
    after = training.state()
    assert all(torch.equal(after["weights"][k], v) for k, v in weights_before.items())
    assert all(torch.equal(a["exp_avg"], b["exp_avg"]) for a, b in zip(after["moments"], moments_now, strict=True))
    scaler_bytes = training.scaler._scale.nbytes + training.scaler._growth_tracker.nbytes
    model_bytes = sum(t.nbytes for t in [*training.model.parameters(), *training.model.buffers()])
    assert snapshot.nbytes == model_bytes + scaler_bytes


def test_taking_and_restoring_read_no_device_value_on_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    training = _Training()
    training.step()
    snapshot = RollbackSnapshot()

    def host_read(*args, **kwargs):
        raise AssertionError("a host read (a device sync on an accelerator)")

    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    snapshot.take(training.model, [training.optimizer], training.scaler)  # GradScaler.state_dict() would read
    snapshot.restore(training.model, [training.optimizer], training.scaler)


def test_a_snapshot_from_before_the_first_step_restores_an_empty_optimizer_state() -> None:
    fresh, rolled_back = _Training(), _Training()
    snapshot = RollbackSnapshot()
    snapshot.take(rolled_back.model, [rolled_back.optimizer])  # Adam has no state yet
    rolled_back.step()
    rolled_back.step()
    snapshot.restore(rolled_back.model, [rolled_back.optimizer])
    assert len(rolled_back.optimizer.state) == 0
    torch.manual_seed(3)
    fresh.step()
    torch.manual_seed(3)
    rolled_back.step()  # Adam initialises its state again, as on a fresh start
    assert all(torch.equal(a, b) for a, b in zip(fresh.model.parameters(), rolled_back.model.parameters(), strict=True))


def test_a_snapshot_above_max_bytes_says_so_once_and_goes_to_disk(tmp_path: Path) -> None:
    training = _Training()
    training.step()
    weights_bytes = sum(p.nbytes for p in training.model.parameters())
    snapshot = RollbackSnapshot(max_bytes=weights_bytes, directory=tmp_path)  # Adam needs 3x: over the bound
    with pytest.warns(UserWarning, match=r"needs .* above max_bytes=.*written to .* background thread"):
        snapshot.take(training.model, [training.optimizer], training.scaler, step=1)
    at_snapshot = training.state()
    assert snapshot.location == "disk" and snapshot.available
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second snapshot over the bound is silent
        snapshot.take(training.model, [training.optimizer], training.scaler, step=1)
    training.step()
    snapshot.restore(training.model, [training.optimizer], training.scaler)
    assert _identical(training.state(), at_snapshot)
    assert snapshot.nbytes == 0 and snapshot.path.exists()
    snapshot.close()
    assert not snapshot.path.exists() and not snapshot.available


def test_a_snapshot_that_fits_neither_the_bound_nor_the_disk_is_not_kept_and_says_so(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(snapshot_budget.shutil, "disk_usage", lambda path: usage._replace(free=1000))
    model = nn.Linear(64, 64)  # 16.6 kB of weights, above half of the 1000 free bytes
    snapshot = RollbackSnapshot(keep="weights", max_bytes=100, directory=tmp_path, local_processes=1)
    with pytest.warns(UserWarning, match=r"above 500 B, this rank's half of the free space .* NO snapshot"):
        snapshot.take(model, step=4)
    assert not snapshot.available and snapshot.step is None and snapshot.nbytes == 0
    assert not snapshot.path.exists()
    with pytest.raises(RuntimeError, match="no snapshot"):
        snapshot.restore(model)


def test_disk_copies_in_flight_stay_under_max_bytes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    model = nn.Sequential(*[nn.Linear(64, 64, bias=False) for _ in range(6)])  # 16 KiB per weight
    seen: list[int] = []
    original_staging = snapshot_disk.FileWriter.staging

    def recording_staging(writer, nbytes):
        buffer = original_staging(writer, nbytes)
        seen.append(writer.pending_bytes)  # host bytes of staging buffers once this copy has one
        return buffer

    monkeypatch.setattr(snapshot_disk.FileWriter, "staging", recording_staging)
    bound = 2 * model[0].weight.nbytes
    snapshot = RollbackSnapshot(keep="weights", location="disk", max_bytes=bound, directory=tmp_path)
    snapshot.take(model)
    assert max(seen) <= bound
    expected = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    snapshot.restore(model)
    assert all(torch.equal(p, e) for p, e in zip(model.parameters(), expected, strict=True))


def test_a_failed_disk_write_leaves_no_snapshot_and_restore_says_why(tmp_path: Path) -> None:
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    model = nn.Linear(3, 3)
    snapshot = RollbackSnapshot(keep="weights", location="disk", directory=blocker)
    snapshot.take(model)
    with pytest.raises(RuntimeError, match=r"writing .*not_a_folder.* failed"):
        snapshot.restore(model)
    assert not snapshot.available
    with pytest.raises(RuntimeError, match="there is no snapshot"):
        snapshot.restore(model)


def test_restoring_into_another_model_is_refused() -> None:
    snapshot = RollbackSnapshot(keep="weights")
    snapshot.take(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="restore into the model the snapshot was taken of"):
        snapshot.restore(nn.Linear(3, 4))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"keep": "optimizer"}, r"`keep` must be one of \('weights', 'weights\+optimizer'\), got 'optimizer'"),
        ({"location": "checkpoint"}, r"`location` must be one of \('memory', 'disk'\), got 'checkpoint'"),
        ({"max_bytes": 0}, r"`max_bytes` must be a positive int \(bytes\), 'auto' or None, got 0"),
        ({"max_bytes": 1.5e9}, r"`max_bytes` must be .* got 1500000000.0"),
        ({"max_bytes": True}, r"`max_bytes` must be .* got True"),
        ({"local_processes": 0}, r"`local_processes` must be a positive int or None, got 0"),
    ],
)
def test_bad_arguments_are_rejected_naming_them(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RollbackSnapshot(**options)


def test_a_directory_that_is_not_a_path_is_rejected() -> None:
    with pytest.raises(TypeError, match=r"`directory` must be a path .* got 3"):
        RollbackSnapshot(directory=3)  # type: ignore[arg-type]


def test_a_callback_validating_the_options_gets_its_own_argument_names() -> None:
    with pytest.raises(ValueError, match=r"`snapshot_location` must be one of \('memory', 'disk'\), got 'ram'"):
        validate_snapshot_options("weights", "ram", "auto", None, prefix="snapshot_")


def test_the_default_bound_keeps_a_7b_fsdp_shard_in_memory_and_sends_the_unsharded_state_to_disk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tib = 2**40
    monkeypatch.setattr(snapshot_budget, "host_memory_bytes", lambda: (tib, int(0.9 * tib)))
    bound = default_max_bytes(local_processes=8)
    assert bound == tib // 4 // 8  # 32 GiB per rank
    adam_fp32_7b = 7e9 * 4 + 2 * 7e9 * 4  # weights + two moments: 84 GB
    assert adam_fp32_7b > bound  # DDP: every rank holds it all -> disk
    assert adam_fp32_7b / 8 < bound  # FSDP over 8 ranks: each holds its 10.5 GB shard -> memory
    monkeypatch.setattr(snapshot_budget, "host_memory_bytes", lambda: (tib, tib // 4))
    assert default_max_bytes(local_processes=8) == tib // 8 // 8  # a busy host: half of what is available


def test_the_default_bound_divides_the_host_among_local_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setattr(snapshot_budget, "host_memory_bytes", lambda: (2**34, 2**34))
    assert RollbackSnapshot().max_bytes == 2**34 // 4 // 4


def test_sharded_parameters_are_snapshotted_as_their_local_shards(tmp_path: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        fully_shard(model)  # FSDP2: DTensor parameters and DTensor Adam state
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

        def step() -> None:
            optimizer.zero_grad()
            model(torch.randn(5, 4)).square().mean().backward()
            optimizer.step()

        step()
        snapshot = RollbackSnapshot(directory=tmp_path)
        snapshot.take(model, [optimizer])
        local = [p.to_local().detach().clone() for p in model.parameters()]
        moments = [optimizer.state[p]["exp_avg"].to_local().clone() for p in model.parameters()]
        assert all(not hasattr(t, "to_local") for t in snapshot._host)  # plain local tensors, nothing gathered
        step()
        snapshot.restore(model, [optimizer])
        assert all(torch.equal(p.to_local(), e) for p, e in zip(model.parameters(), local, strict=True))
        restored = [optimizer.state[p]["exp_avg"] for p in model.parameters()]
        assert all(hasattr(m, "to_local") for m in restored)  # still DTensors: the optimizer's own tensors
        assert all(torch.equal(m.to_local(), e) for m, e in zip(restored, moments, strict=True))
        step()  # and training goes on
    finally:
        dist.destroy_process_group()


def _fsdp2_rank(rank: int, store_path: str, out_dir: str) -> None:
    """One rank of a 2-process FSDP2 job: snapshot, perturb, restore; write what it held and whether it matched."""
    import json

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 16))
        full_bytes = sum(p.nbytes for p in model.parameters())
        fully_shard(model)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

        def step() -> None:
            optimizer.zero_grad()
            torch.manual_seed(rank)
            model(torch.randn(4, 16)).square().mean().backward()
            optimizer.step()

        step()
        snapshot = RollbackSnapshot(keep="weights+optimizer")
        snapshot.take(model, [optimizer])
        expected = [p.to_local().clone() for p in model.parameters()]
        step()
        snapshot.restore(model, [optimizer])
        restored = all(torch.equal(p.to_local(), e) for p, e in zip(model.parameters(), expected, strict=True))
        local_parameter_bytes = sum(p.to_local().nbytes for p in model.parameters())
        result = {"nbytes": snapshot.nbytes, "local": local_parameter_bytes, "full": full_bytes, "ok": restored}
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
@pytest.mark.timeout(120)
def test_under_fsdp2_each_of_two_ranks_holds_only_its_shard(tmp_path: Path) -> None:
    import json

    import torch.distributed as dist
    import torch.multiprocessing as mp

    if dist.is_initialized():  # a forked rank would inherit this process's group
        pytest.skip("a process group is already initialised in this process")
    # fork: the ranks start from this process's imports instead of importing torch again (seconds each)
    mp.start_processes(
        _fsdp2_rank, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True, start_method="fork"
    )
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["ok"] for r in ranks)
    full = ranks[0]["full"]
    assert sum(r["local"] for r in ranks) == full  # the shards partition the parameters
    for r in ranks:  # weights + two Adam moments of the local shard (+ step counters): about 3/2 of the full weights
        assert 3 * r["local"] <= r["nbytes"] <= 3 * r["local"] + 1024
        assert r["nbytes"] < 0.6 * 3 * full


def test_the_class_example_runs() -> None:
    docstring = RollbackSnapshot.__doc__ or ""
    example = textwrap.dedent(re.split(r"Example::\n", docstring)[1])
    exec(compile(example, "RollbackSnapshot example", "exec"), {"RollbackSnapshot": RollbackSnapshot})
