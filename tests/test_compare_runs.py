"""``scripts/compare_runs.py``: the check that a rule change left every benchmark run it should not touch as it was."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_runs.py"


def _script():
    spec = importlib.util.spec_from_file_location("compare_runs", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _results(path: Path, final_losses: list[float], skips: list[int]) -> Path:
    runs = [
        {"task": "t", "method": "guard", "seed": seed, "perturb": 0.0, "status": "finished", "final_loss": loss,
         "actions": {"counts": {"skip": skip}, "lr_scale": 1.0}}
        for seed, (loss, skip) in enumerate(zip(final_losses, skips, strict=True))
    ]
    path.write_text(json.dumps({"runs": runs, "machine": {"cpu": "test", "cores": 1, "commit": "abc"}}))
    return path


def test_identical_runs_are_counted_and_a_moved_loss_or_action_count_is_listed(tmp_path: Path) -> None:
    compare_runs = _script()
    old = _results(tmp_path / "old.json", [0.5, 0.25, 0.125], [0, 1, 2])
    new = _results(tmp_path / "new.json", [0.5, 0.25, 0.2], [0, 3, 2])
    differences, same = compare_runs.compare(compare_runs.load_runs(old), compare_runs.load_runs(new))
    assert same == 1
    assert [key for key, _, _ in differences] == [("t", "guard", 1, 0.0), ("t", "guard", 2, 0.0)]
    output = tmp_path / "out.md"
    compare_runs.main([str(old), str(new), "--output", str(output)])
    text = output.read_text()
    assert "| 1 | 2 |" in text and "t/guard/1/0.0: skip 1 -> 3" in text and "final_loss 0.125 -> 0.2" in text
