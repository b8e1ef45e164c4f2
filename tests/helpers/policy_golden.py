"""Golden decisions of the guard's policy: seeded streams of observations driven through ``ExplosionPolicy`` under
several configurations, every ``Decision`` and the final ``state_dict()`` recorded.

The fixture ``tests/fixtures/policy_golden.json`` was written by this module from the policy as it was before it
was split into the ``guard`` package; ``tests/test_policy.py`` regenerates it and compares exactly (the policy is
plain Python floating point: same inputs, same bits). Regenerate it only for a change that means to change the
guard's decisions: ``python -m tests.helpers.policy_golden``.

A stream is a simulated run whose loss belongs to its weights (an update moves it, a skip leaves it, a rollback
returns to the snapshot's, an undone rollback check to the weights kept aside), with episodes drawn at random:
gradient spikes, non-finite steps, fp16 overflows and collapsed loss scales, loss spikes, divergences, a moved
objective, a new gradient scale, growth, zero gradients and negative losses. The adapter's other calls
(``forget_snapshot``, ``abandon_rollback_check``, a checkpoint round trip into a fresh policy) come at random steps.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
from pathlib import Path
from typing import Any

from lightning_gradstab.guard.config import PolicyConfig
from lightning_gradstab.guard.decision import Decision
from lightning_gradstab.guard.detect import Observation
from lightning_gradstab.guard.ladder import ExplosionPolicy

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "policy_golden.json"

CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},
    "skip_sgd": {"max_rung": "skip", "budgets": {"clip": 3, "tight_clip": 2}, "warmup_steps": 12},
    "fp16_tight": {
        "loss_rules": True, "max_norm": 1.0, "budgets": {"skip": 2, "lr_backoff": 2, "rollback": 2},
        "backoff_factor": 0.25, "lr_recovery_steps": 10, "snapshot_every": 30, "healthy_steps_to_deescalate": 20,
        "warmup_steps": 10, "drift_horizon_steps": 200, "loss_rise_tolerance": 0.2, "tight_clip_ratio": 2.0,
        "loss_scale_floor": 2.0,
    },
    "rollback_no_drift": {
        "max_rung": "rollback", "drift_horizon_steps": None, "max_update_ratio": None, "max_norm": None,
        "loss_zscore_threshold": 4.0, "growth_window": 8, "growth_factor": 4.0, "ema_decay": 0.9,
    },
    "clip_only": {"max_rung": "clip", "loss_zscore_threshold": None, "loss_rise_tolerance": None},
    "observe": {"max_rung": "observe", "loss_rules": False, "max_norm": 2.0},
}
"""The configurations the streams run under, by name (``PolicyConfig`` keyword arguments)."""

KINDS = {"default": "adam", "skip_sgd": "sgd", "fp16_tight": "fp16", "rollback_no_drift": "sgd",
         "clip_only": "adam", "observe": "fp16"}
"""The optimizer each configuration's streams imitate: Adam (scale-invariant, a scheduled ``lr``), plain SGD
(``step_size`` and ``weight_norm``, no ``lr``) or Adam under an fp16 ``GradScaler`` (``loss_scale``)."""

RECORDED = [("default", 7, 300), ("skip_sgd", 0, 300), ("fp16_tight", 20, 300), ("rollback_no_drift", 12, 300),
            ("clip_only", 0, 300), ("observe", 0, 300)]
"""Streams whose every decision is kept in the fixture, readable: ``(config, seed, steps)`` (seeds chosen so that
the short streams hold rollback checks kept and undone, a loss-scale collapse and a stop)."""

DIGESTED = [(name, seed, 2500) for name in CONFIGS for seed in (1, 10, 11)]
"""Longer streams kept as a SHA-256 of their records (every decision with its properties, the public queries after
each step, the final state), so the fixture stays small."""

EPISODES = ("spike", "nonfinite", "overflow", "collapse", "loss_spike", "diverge", "objective", "regime", "growth",
            "zero", "rank_local", "negative", "climb")


def _decision(decision: Decision, derived: bool) -> list[Any]:
    """The fields of ``decision`` in their order, and with ``derived`` its properties."""
    fields = [
        decision.step, decision.level, decision.anomaly, decision.zscore, decision.clip_threshold,
        decision.clip_coefficient, decision.skip, decision.lr_scale, decision.rollback, decision.stop,
        decision.snapshot, decision.loss_zscore, decision.reset_loss_scale, decision.rollback_check,
    ]
    return [*fields, decision.rung, decision.evidence, decision.actions] if derived else fields


class _World:
    """A run whose loss belongs to its weights, and the episodes that disturb it."""

    def __init__(self, kind: str, rng: random.Random) -> None:
        self.kind, self.rng = kind, rng
        self.log_norm = rng.uniform(-1.0, 2.0)
        self.weights_loss = rng.uniform(1.0, 4.0)
        self.objective = 1.0
        self.snapshot = self.aside = self.weights_loss
        self.episode: str | None = None
        self.left = 0
        self.loss_scale = 65536.0
        self.negative = False
        self.lr = 1e-3

    def observation(self, step: int) -> Observation:
        rng = self.rng
        if self.left <= 0:
            self.episode = None
            if step > 15 and rng.random() < 0.06:
                self.episode = rng.choice(EPISODES)
                self.left = {"diverge": rng.randint(5, 30), "growth": 20, "climb": 120, "zero": rng.randint(1, 8),
                             "regime": 1, "objective": 1, "negative": 1}.get(self.episode, rng.randint(1, 3))
        episode = self.episode
        self.left -= 1
        norm = math.exp(self.log_norm + rng.gauss(0.0, 0.25))
        noise = math.exp(rng.gauss(0.0, 0.04))
        nonfinite, rank_local, loss_scale = False, False, None
        if episode == "spike":
            norm *= 10.0 ** rng.uniform(0.5, 4.0)
        elif episode in ("nonfinite", "rank_local"):
            nonfinite, norm = True, rng.choice([math.inf, math.nan, 3.0])
            rank_local = episode == "rank_local"
        elif episode == "overflow":
            nonfinite, norm = True, math.inf
        elif episode == "growth":
            self.log_norm += 0.3
        elif episode == "climb":
            self.log_norm += 0.01
            self.weights_loss *= 1.002
        elif episode == "regime":
            self.log_norm += math.log(rng.choice([0.05, 30.0]))
        elif episode == "objective":
            self.objective *= rng.choice([1.6, 2.5])
        elif episode == "diverge":
            self.weights_loss *= 1.12
            norm *= 1.5
        elif episode == "zero":
            norm = 0.0
        elif episode == "negative":
            self.negative = True
        if self.kind == "fp16":
            if episode == "overflow":
                self.loss_scale = max(self.loss_scale / 2.0, 2.0**-8)
            loss_scale = rng.choice([0.5, 2.0**-10]) if episode == "collapse" else self.loss_scale
            if nonfinite and not rank_local:
                self.loss_scale = max(self.loss_scale / 2.0, 2.0**-8)
        loss: float | None = self.weights_loss * self.objective * noise
        if episode == "loss_spike":
            loss *= rng.choice([8.0, 40.0, 1e3])
        if self.negative:
            loss -= 5.0
        if rng.random() < 0.03:
            loss = None
        elif rng.random() < 0.01:
            loss = math.nan
        self.lr = 1e-3 * (0.5 + 0.5 * math.cos(step / 400.0))
        if self.kind == "sgd":
            lr = 0.05 if rng.random() < 0.9 else 0.5
            return Observation(norm, nonfinite, loss_scale, rank_local, loss, weight_norm=20.0 + step / 100.0,
                               step_size=lr / (1.0 - 0.9), lr=None, scale_invariant=False)
        lr_value = self.lr if rng.random() < 0.95 else rng.choice([None, 0.0])
        return Observation(norm, nonfinite, loss_scale, rank_local, loss, lr=lr_value, scale_invariant=True)

    def carry_out(self, decision: Decision) -> None:
        if decision.snapshot:  # the state before this step
            self.snapshot = self.weights_loss
        if decision.rollback_check == "start":
            self.aside = self.weights_loss
        if decision.rollback:
            self.weights_loss = self.snapshot
        elif decision.rollback_check == "undo":
            self.weights_loss = self.aside
        elif not decision.skip:
            self.weights_loss *= 1.0 - 0.003 * decision.lr_scale * decision.clip_coefficient
        if decision.reset_loss_scale:
            self.loss_scale = 65536.0


def _queries(policy: ExplosionPolicy, lr: float | None) -> list[Any]:
    return [
        policy.level, policy.steps, policy.lr_scale, policy.events_recorded, policy.lr_ceiling(lr if lr else None),
        policy.lr_ceiling(None), policy.reference_norm, policy.drift(), policy.loss_rules_active,
        policy.loss_rules_off_reason, len(policy.events_since(max(0, policy.events_recorded - 3))),
    ]


def run_stream(name: str, seed: int, steps: int, queries: bool = False) -> dict[str, Any]:
    """Drive one stream; its decisions (and, with ``queries``, the public queries after each step), the adapter
    calls made, the last rollback check, the counts and the final ``state_dict()``."""
    config = PolicyConfig(**copy.deepcopy(CONFIGS[name]))
    rng = random.Random(f"{name}-{seed}")
    world = _World(KINDS[name], random.Random(f"{name}-{seed}-world"))
    max_events = 25
    policy = ExplosionPolicy(config, max_events=max_events)
    decisions, calls = [], []
    round_trip = rng.randint(steps // 3, 2 * steps // 3)
    for step in range(1, steps + 1):
        observation = world.observation(step)
        decision = policy.step(observation)
        world.carry_out(decision)
        record = _decision(decision, derived=queries)
        if queries:
            record.append(_queries(policy, observation.lr))
        decisions.append(record)
        if decision.rollback_check == "start" and rng.random() < 0.3:
            policy.abandon_rollback_check()
            calls.append([step, "abandon_rollback_check"])
        if rng.random() < 0.01:
            policy.abandon_rollback_check()  # mostly outside a check: a no-op
            calls.append([step, "abandon_rollback_check_anywhere"])
        if rng.random() < 0.01:
            policy.forget_snapshot()
            calls.append([step, "forget_snapshot"])
        if name in ("default", "rollback_no_drift") and step == steps - 60 and rng.random() < 0.5:
            policy.disable_loss_rules("competing losses")
            calls.append([step, "disable_loss_rules"])
        if step == round_trip or rng.random() < 0.004:
            resumed = ExplosionPolicy(config, max_events=max_events)
            resumed.load_state_dict(copy.deepcopy(policy.state_dict()))
            policy = resumed
            calls.append([step, "resume"])
    return {
        "decisions": decisions,
        "calls": calls,
        "last_rollback_check": policy.last_rollback_check,
        "counts": policy.counts,
        "state_dict": policy.state_dict(),  # the kept events and the worst spikes included
    }


def _digest(record: dict[str, Any]) -> str:
    return hashlib.sha256(dumps(record).encode()).hexdigest()


def dumps(value: Any) -> str:
    """The canonical JSON text of a record (floats as ``repr``, exact; ``NaN`` and ``Infinity`` kept)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def golden() -> dict[str, Any]:
    """Everything the fixture holds, regenerated from the code as it is now."""
    return {
        "recorded": {f"{name}/{seed}": run_stream(name, seed, steps) for name, seed, steps in RECORDED},
        "digested": {
            f"{name}/{seed}": _digest(run_stream(name, seed, steps, queries=True)) for name, seed, steps in DIGESTED
        },
    }


def coverage(record: dict[str, Any]) -> dict[str, int]:
    """How often each anomaly, action and rollback-check step occurs in a stream's record (to see what it covers)."""
    found: dict[str, int] = {}
    for decision in record["decisions"]:
        keys = [f"anomaly:{decision[2]}", f"level:{decision[1]}", f"check:{decision[13]}"]
        flags = (("skip", 6), ("rollback", 8), ("stop", 9), ("snapshot", 10))
        keys += [name for name, index in flags if decision[index]]
        if decision[12]:
            keys.append("reset_loss_scale")
        for key in keys:
            found[key] = found.get(key, 0) + 1
    return found


def fixture_text(value: dict[str, Any]) -> str:
    """The fixture's JSON text: one decision a line, so that a diff shows the steps that changed."""
    lines = ['{"digested": ' + dumps(value["digested"]) + ",", ' "recorded": {']
    streams = list(value["recorded"].items())
    for index, (key, record) in enumerate(streams):
        rest = {name: part for name, part in record.items() if name != "decisions"}
        lines.append(f"  {dumps(key)}: {{{dumps(rest)[1:-1]},")
        lines.append('   "decisions": [')
        lines += [f"    {dumps(decision)}," for decision in record["decisions"]]
        lines[-1] = lines[-1].removesuffix(",")
        lines.append("  ]}" + ("," if index < len(streams) - 1 else ""))
    lines.append("}}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    FIXTURE.parent.mkdir(exist_ok=True)
    text = fixture_text(golden())
    FIXTURE.write_text(text)
    print(f"wrote {FIXTURE} ({len(text) / 1024:.0f} KiB)")
