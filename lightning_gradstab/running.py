"""Running statistics of a gradient-norm stream, and the one cross-rank reduction a decision needs.

Gradient norms are positive and blow up multiplicatively, so the statistics live in log space: a 1e4x spike
is a distance of 9.2 from the mean, not a value that dominates the variance it is measured against (the
failure of EMA statistics on the raw norm). Everything here is plain PyTorch/Python, checkpointable through
``state_dict``/``load_state_dict``, and fed only with values that are already identical on every rank, so the
statistics never diverge across ranks.
"""

from __future__ import annotations

import itertools
import math
import struct
from bisect import bisect_left, insort
from collections import deque
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

ReduceKind = Literal["max", "min", "max_worst"]


class RunningMoments:
    """Mean and variance of a stream: exact over a warm-up (Welford), then an exponential moving average.

    The warm-up uses Welford's exact mean/variance, so the first z-scores are not biased toward an
    arbitrary initial value (ZClip initialises its EMA the same way). Callers feed it the *clipped* value of
    each usable step and nothing on a non-finite one, so one outlier cannot inflate the variance that decides
    what the next outlier is.

    Args:
        decay: EMA weight of the past, in (0, 1) (ZClip uses 0.97: an effective window of ~33 steps).
        warmup_steps: values averaged exactly before z-scores are reported, >= 1.
        std_floor: lower bound of the standard deviation used in z-scores, >= 0.
        relative_std_floor: a second lower bound, as a fraction of ``|mean|`` (a deterministic stream would
            otherwise flag a rounding wobble as a many-sigma event).

    Example::

        losses = RunningMoments(decay=0.97, warmup_steps=5, relative_std_floor=0.01)
        for loss in [2.3, 2.2, 2.25, 2.1, 2.15, 2.05]:
            losses.update(loss)
        losses.zscore(4.0)  # about 29: a loss spike
    """

    def __init__(
        self, decay: float = 0.97, warmup_steps: int = 25, std_floor: float = 0.0, relative_std_floor: float = 0.0
    ) -> None:
        self.decay = decay
        self.warmup_steps = warmup_steps
        self.std_floor = std_floor
        self.relative_std_floor = relative_std_floor
        self.count = 0
        self.mean = 0.0
        self.variance = 0.0

    def _transform(self, value: float) -> float:
        return value

    @property
    def warmed_up(self) -> bool:
        """Whether enough values were seen for z-scores to mean something."""
        return self.count >= self.warmup_steps

    @property
    def std(self) -> float:
        """Standard deviation used in z-scores (never below either floor)."""
        return max(math.sqrt(max(self.variance, 0.0)), self.std_floor, self.relative_std_floor * abs(self.mean))

    def zscore(self, value: float) -> float:
        """How many standard deviations ``value`` lies above the running mean (0 during the warm-up)."""
        if not self.warmed_up:
            return 0.0
        return (self._transform(value) - self.mean) / self.std if self.std > 0 else 0.0

    def update(self, value: float) -> None:
        """Add one finite value (the clipped one, if the step was an outlier)."""
        value = self._transform(value)
        self.count += 1
        if self.count <= self.warmup_steps:  # Welford: exact mean and (population) variance
            delta = value - self.mean
            self.mean += delta / self.count
            self.variance += (delta * (value - self.mean) - self.variance) / self.count
            return
        delta = value - self.mean
        self.mean += (1.0 - self.decay) * delta
        self.variance = self.decay * (self.variance + (1.0 - self.decay) * delta * delta)

    def state_dict(self) -> dict[str, float]:
        """Everything needed to continue the stream after a restart."""
        return {"count": self.count, "mean": self.mean, "variance": self.variance}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Continue from a ``state_dict``."""
        self.count = int(state["count"])
        self.mean = float(state["mean"])
        self.variance = float(state["variance"])


class LogNormStatistics(RunningMoments):
    """:class:`RunningMoments` of ``log(norm)``: gradient norms are positive and blow up multiplicatively.

    Args:
        decay: EMA weight of the past, in (0, 1).
        warmup_steps: finite steps averaged exactly before z-scores are reported, >= 1.
        log_std_floor: lower bound of the log-norm standard deviation used in z-scores, >= 0. A very steady
            stream would otherwise flag a 1 % wobble as a many-sigma event.

    Example::

        statistics = LogNormStatistics(decay=0.97, warmup_steps=25)
        for norm in [1.0, 1.1, 0.9] * 10:
            statistics.update(norm)
        statistics.zscore(100.0)  # about 56: a spike
    """

    def __init__(self, decay: float = 0.97, warmup_steps: int = 25, log_std_floor: float = 0.05) -> None:
        super().__init__(decay, warmup_steps, std_floor=log_std_floor)
        self.log_std_floor = log_std_floor

    def _transform(self, value: float) -> float:
        return _safe_log(value)

    @property
    def typical_norm(self) -> float:
        """The running geometric mean of the norm, ``exp(mean of log-norm)`` (nan before the first update)."""
        return math.exp(self.mean) if self.count else math.nan

    def norm_at(self, zscore: float) -> float:
        """The norm that sits ``zscore`` standard deviations above the running mean."""
        return math.exp(self.mean + zscore * self.std)

    def move_to(self, log_level: float) -> None:
        """Shift the running mean of ``log(norm)`` to ``log_level`` and keep the spread and the count: a new
        scale of the same stream (the same noise, multiplied) is a shift in log space.

        Example::

            import math
            statistics = LogNormStatistics(warmup_steps=3)
            for norm in [1.0, 1.2, 0.8, 1.1]:
                statistics.update(norm)
            spread = statistics.std
            statistics.move_to(math.log(10.0))
            statistics.typical_norm, statistics.std == spread  # (about 10.0, True)
        """
        if self.count:
            self.mean = log_level


RECENT_HORIZONS = 3
"""Horizons of losses a :class:`LossTrend` keeps to leave its heaviest batch out of the smoothed loss: a batch that
old weighs ``e^-3`` (5 %) of its first weight in the average."""


class LossTrend:
    """The smoothed training loss and the lowest value it has reached: the evidence of divergence.

    The smoothed loss is a bias-corrected EMA (as Adam corrects its moments), so it is an unbiased average
    from the first step on. A step size that is stable makes the loss fall on average (the descent lemma:
    for an L-smooth loss, gradient descent with step size below ``2 / L`` cannot increase it); a smoothed
    loss that climbs well above the lowest value it reached says the step is too large, whatever the
    gradient norms did.

    Args:
        horizon_steps: effective window of the smoothing, ``1 / (1 - decay)``, >= 1.

    Example::

        trend = LossTrend(horizon_steps=5)
        for loss in [2.3, 2.0, 1.8, 2.5, 4.0, 9.0]:
            trend.update(loss)
        trend.rise()  # about 3.3: the smoothed loss is far above its lowest value
    """

    def __init__(self, horizon_steps: float = 10.0) -> None:
        self.decay = 1.0 - 1.0 / horizon_steps
        self.horizon = max(1, math.ceil(horizon_steps))  # the losses whose median is the level (median_with)
        self.count = 0
        self.average = 0.0  # the raw EMA; ``smoothed`` corrects its bias toward the zero start
        self.lowest = math.inf
        self.noise_at_lowest = 0.0  # the loss noise (std) when the lowest value was reached: not the climb's
        self.weight_norm_at_lowest = 0.0  # the weights' norm then (0: not measured), for plain SGD's weight growth
        # the last losses, for the smoothed loss without its heaviest batch (older ones weigh under e^-3 of the newest)
        self.recent: deque[float] = deque(maxlen=math.ceil(RECENT_HORIZONS * horizon_steps))

    @property
    def smoothed(self) -> float:
        """The bias-corrected EMA of the loss (nan before the first update)."""
        if not self.count:
            return math.nan
        return self.average / (1.0 - self.decay**self.count) if self.decay > 0 else self.average

    def update(self, loss: float, *, healthy: bool = True, noise: float = 0.0, weight_norm: float = 0.0) -> None:
        """Add one finite loss; only ``healthy`` steps may lower the reference (``noise``: the loss std now;
        ``weight_norm``: the weights' norm now, 0 when not measured)."""
        self.count += 1
        self.average = self.decay * self.average + (1.0 - self.decay) * loss
        self.recent.append(loss)
        # the first loss is the reference whatever the step was judged: a run must not end worse than it began
        if (healthy or not math.isfinite(self.lowest)) and self.smoothed <= self.lowest:
            self.lowest, self.noise_at_lowest, self.weight_norm_at_lowest = self.smoothed, noise, weight_norm

    def restart_at(self, loss: float, weight_norm: float = 0.0) -> None:
        """Judge the next rise from ``loss``: the smoothed loss and its lowest value become ``loss`` (the noise at
        the lowest is kept: a climb inflates the running spread; ``weight_norm``: the weights' norm now, 0 when not
        measured). A verdict already given on a level must not be given again while the smoothed loss, which lags
        the raw losses by about its horizon, catches up with it."""
        self.count = 1
        self.average = (1.0 - self.decay) * loss if self.decay > 0 else loss
        self.lowest = loss
        self.weight_norm_at_lowest = weight_norm
        self.recent.clear()
        self.recent.append(loss)

    def smoothed_with(self, loss: float) -> float:
        """The smoothed loss :meth:`update` with ``loss`` would give, without changing anything."""
        average = self.decay * self.average + (1.0 - self.decay) * loss
        return average / (1.0 - self.decay ** (self.count + 1)) if self.decay > 0 else average

    def smoothed_without_heaviest_with(self, loss: float) -> float:
        """The smoothed loss :meth:`update` with ``loss`` would give, with the one batch that weighs most in it left
        out (its weight times its loss; the average renormalised over the others): a leave-one-out, so that a rise
        one batch makes is told from a rise of the loss's level. Equal to :meth:`smoothed_with` when every batch
        had the same loss, and ``loss`` itself when no other batch is left.

        Example::

            trend = LossTrend(horizon_steps=10)
            for _ in range(30):
                trend.update(1.0)
            trend.smoothed_with(11.0), trend.smoothed_without_heaviest_with(11.0)  # about (2.0, 1.0)
        """
        if self.decay <= 0:
            return loss
        # never more losses than the average holds (a hand-edited state could keep more than its count)
        values = [*self.recent, loss][-min(self.count + 1, len(self.recent) + 1) :]
        weights = [(1.0 - self.decay) * self.decay ** (len(values) - 1 - i) for i in range(len(values))]
        heaviest = max(range(len(values)), key=lambda i: weights[i] * values[i])
        total = 1.0 - self.decay ** (self.count + 1)  # the weights of every loss since the start (bias correction)
        rest = total - weights[heaviest]
        if rest <= 1e-12 * total:
            return loss
        average = self.decay * self.average + (1.0 - self.decay) * loss
        return (average - weights[heaviest] * values[heaviest]) / rest

    def median_with(self, loss: float) -> float:
        """The median of the last ``horizon`` losses, ``loss`` the newest of them (fewer after a restart).

        The smoothed loss is a mean, and a mean follows a few heavy batches; the median moves only when at least
        half of the batches of one horizon do (a breakdown point of 50 %, against the one batch that
        :meth:`smoothed_without_heaviest_with` leaves out).

        Example::

            trend = LossTrend(horizon_steps=5)
            for loss in [1.0, 1.1, 9.0, 0.9, 12.0]:
                trend.update(loss)
            trend.smoothed_with(1.0), trend.median_with(1.0)  # about (4.5, 1.1): two heavy batches, no level
        """
        values = sorted([*itertools.islice(reversed(self.recent), self.horizon - 1), loss])
        middle = len(values) // 2
        return values[middle] if len(values) % 2 else 0.5 * (values[middle - 1] + values[middle])

    def rise(self) -> float:
        """How far the smoothed loss lies above the lowest value it reached (0 before there is one)."""
        return self.smoothed - self.lowest if self.count and math.isfinite(self.lowest) else 0.0

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue after a restart."""
        return {
            "count": self.count, "average": self.average, "lowest": self.lowest,
            "noise_at_lowest": self.noise_at_lowest, "weight_norm_at_lowest": self.weight_norm_at_lowest,
            "recent": list(self.recent),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a ``state_dict``."""
        self.count = int(state["count"])
        self.average = float(state["average"])
        self.lowest = float(state["lowest"])
        self.noise_at_lowest = float(state["noise_at_lowest"])
        self.weight_norm_at_lowest = float(state.get("weight_norm_at_lowest", 0.0))  # not in versions <= 10
        self.recent.clear()
        self.recent.extend(float(loss) for loss in state.get("recent", ()))  # none in a policy state of version <= 8


GROWTH_FIT_POINTS = 32
"""Most points the growth trend is fitted to: a longer window is split into this many consecutive blocks, each
represented by its median ``log(norm)`` at its mean step, so the per-step cost stays O(window)."""


class GrowthWindow:
    """Detects a norm that keeps rising: the robust trend of ``log(norm)`` over the last steps.

    A spike detector against a moving average cannot see slow, steady growth (the average follows it);
    the fitted slope times the window length can: it is the log of the growth factor over the window. The
    slope is the Theil-Sen estimate (median of pairwise slopes), so one or two isolated spikes in the window,
    which the clipper already handled, do not read as a trend (breakdown point ~29 %).

    Pairwise slopes are quadratic in the number of points, so a window longer than ``GROWTH_FIT_POINTS`` (32)
    is fitted on that many block medians (consecutive steps, each block's median at its mean step): exact
    Theil-Sen up to 32 steps, O(window) per step above (``growth_window=2000`` cost 0.6-1.0 s per step when
    all ~2M pairs were sorted). A block median ignores spikes in under half of its steps, so the estimate
    stays robust.

    Args:
        window_steps: how many recent finite norms the trend is fitted to, >= 3.

    Example::

        window = GrowthWindow(window_steps=10)
        for step in range(10):
            window.push(1.5**step)
        window.growth_factor()  # about 38 (= 1.5**9)
    """

    def __init__(self, window_steps: int = 20) -> None:
        self.window_steps = window_steps
        self.log_norms: deque[float] = deque(maxlen=window_steps)
        # exact Theil-Sen windows (<= GROWTH_FIT_POINTS steps) keep their pairwise slopes sorted, updated as the
        # window slides: a slope depends on two values and their distance in steps, not on where the window
        # starts, so a push drops the oldest point's slopes and adds the new one's (O(window) per step, not a
        # sort of window^2 / 2 slopes); the median read from it is the one a full recomputation gives, bit for
        # bit. ``None``: not kept (not built yet, a window above GROWTH_FIT_POINTS, or a non-finite value)
        self._sorted_slopes: list[float] | None = None
        self._cached: float | None = None  # growth_factor() of the current window

    def push(self, norm: float) -> None:
        """Add the raw norm of one finite step."""
        value = _safe_log(norm)
        self._cached = None
        slopes = self._sorted_slopes
        if slopes is not None:
            if not math.isfinite(value):
                self._sorted_slopes = None
            else:
                points = self.log_norms
                n = len(points)
                if n == self.window_steps:  # the oldest point leaves: its slopes to every later point go
                    oldest = points[0]
                    for distance, later in enumerate(itertools.islice(points, 1, None), start=1):
                        del slopes[bisect_left(slopes, (later - oldest) / distance)]
                    n -= 1
                    start = 1
                else:
                    start = 0
                for distance, earlier in zip(range(n, 0, -1), itertools.islice(points, start, None), strict=True):
                    insort(slopes, (value - earlier) / distance)
        self.log_norms.append(value)

    def growth_factor(self) -> float:
        """Fitted growth of the norm across the full window (1.0 until the window is full)."""
        n = len(self.log_norms)
        if n < self.window_steps:
            return 1.0
        if self._cached is None:
            self._cached = self._fit(n)
        return self._cached

    def _fit(self, n: int) -> float:
        if n <= GROWTH_FIT_POINTS:
            if self._sorted_slopes is None:
                self._rebuild_slopes()
            if self._sorted_slopes is not None:
                return math.exp(min(_median_of_sorted(self._sorted_slopes) * (n - 1), 700.0))
        values = list(self.log_norms)
        steps: list[float]
        if n <= GROWTH_FIT_POINTS:
            steps, levels = list(range(n)), values
        else:  # block medians: GROWTH_FIT_POINTS consecutive blocks of n // GROWTH_FIT_POINTS (+1) steps
            bounds = [n * block // GROWTH_FIT_POINTS for block in range(GROWTH_FIT_POINTS + 1)]
            steps = [0.5 * (start + end - 1) for start, end in itertools.pairwise(bounds)]
            levels = [_median(values[start:end]) for start, end in itertools.pairwise(bounds)]
        points = len(levels)
        slope = _median([
            (levels[j] - levels[i]) / (steps[j] - steps[i]) for i in range(points) for j in range(i + 1, points)
        ])
        return math.exp(min(slope * (n - 1), 700.0))

    def _rebuild_slopes(self) -> None:
        """Sort every pairwise slope of the window (once; pushes keep it sorted), unless a value is not finite
        (a NaN has no place in a sorted list: those windows are fitted from scratch)."""
        values = list(self.log_norms)
        if len(values) > GROWTH_FIT_POINTS or not all(math.isfinite(v) for v in values):
            self._sorted_slopes = None
            return
        points = len(values)
        self._sorted_slopes = sorted(
            (values[j] - values[i]) / (j - i) for i in range(points) for j in range(i + 1, points)
        )

    def clear(self) -> None:
        """Forget the history (after a rollback the old trend describes weights that no longer exist)."""
        self.log_norms.clear()
        self._sorted_slopes = None
        self._cached = None

    def state_dict(self) -> dict[str, Any]:
        """The recent log-norms."""
        return {"log_norms": list(self.log_norms)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a ``state_dict``."""
        self.log_norms = deque((float(v) for v in state["log_norms"]), maxlen=self.window_steps)
        self._sorted_slopes = None
        self._cached = None


class RankReduction:
    """Named per-rank values, reduced across ranks in ONE collective and read on the host in ONE sync.

    Each field declares how it combines across ranks, next to its name (as torchmetrics' ``dist_reduce_fx``):
    ``"max"`` (any rank's fault, the largest norm), ``"min"`` (the smallest loss scale) or ``"max_worst"`` (the
    largest, a non-finite value counting as the largest of all: a loss, where NaN and -Inf are as bad as +Inf).
    All travel in a single ``all_reduce(MAX)`` (a minimum is the negated maximum of negated values). MAX over NaN
    is backend-dependent, so before the collective NaN becomes 0 (``"max_worst"``: any non-finite value becomes
    ``FLOAT32_MAX``) and +-Inf becomes +-``FLOAT32_MAX``: carry "not finite" of a ``"max"``/``"min"`` value in a
    field of its own (e.g. a count of non-finite gradients).

    Args:
        fields: ``(name, "max" | "min" | "max_worst")`` pairs, in packing order.

    Example::

        reduction = RankReduction([("total_norm", "max"), ("nonfinite_count", "max"), ("loss_scale", "min")])
        values = reduction.reduce({"total_norm": norm, "nonfinite_count": count, "loss_scale": scale})
        values["nonfinite_count"]  # a Python float, identical on every rank
    """

    def __init__(self, fields: Sequence[tuple[str, ReduceKind]]) -> None:
        for name, kind in fields:
            if kind not in ("max", "min", "max_worst"):
                raise ValueError(
                    f"`fields` entry {name!r} has reduce kind {kind!r}; accepted: 'max', 'min', 'max_worst'"
                )
        self.fields = tuple(fields)
        self._signs = [-1.0 if kind == "min" else 1.0 for _, kind in self.fields]
        self._worst = [kind == "max_worst" for _, kind in self.fields]
        self._buffers: dict[torch.device, tuple[Tensor, Tensor, Tensor | None]] = {}

    def reduce(self, values: dict[str, Tensor | float], *, distributed: bool) -> dict[str, float]:
        """Pack, reduce across ranks when ``distributed`` (every rank must agree on it), read back once.

        Every rank must call this on the same steps when ``distributed`` is true: it enters a collective.
        """
        return self.reduce_with_vector(values, None, distributed=distributed)[0]

    def reduce_with_vector(
        self, values: dict[str, Tensor | float], vector: Tensor | None, *, distributed: bool
    ) -> tuple[dict[str, float], list[float]]:
        """:meth:`reduce`, with a float32 vector of ``"max"`` values (per-head attention logits) carried in the same
        collective and the same host read; every rank must pass a vector of the same length (or every rank
        None). NaN reads as 0 and +Inf as ``FLOAT32_MAX``, as for the named ``"max"`` fields."""
        if vector is not None and vector.numel() == 0:
            vector = None
        if not (distributed and dist.is_available() and dist.is_initialized()) and vector is None:
            local = self._read_locally(values)
            if local is not None:
                return local, []
        device = next((v.device for v in values.values() if isinstance(v, Tensor)), torch.device("cpu"))
        if device not in self._buffers:  # (staging vector, signs, worst mask), reused every step: no allocation
            signs = torch.tensor(self._signs, dtype=torch.float32, device=device)
            worst = torch.tensor(self._worst, device=device) if any(self._worst) else None
            self._buffers[device] = (torch.empty(len(self.fields), dtype=torch.float32, device=device), signs, worst)
        staging, signs, worst = self._buffers[device]
        for position, (name, _) in enumerate(self.fields):
            value = values[name]
            if isinstance(value, Tensor):
                staging[position].copy_(value.reshape(()))
            else:
                staging[position].fill_(float(value))
        packed = torch.nan_to_num(staging * signs, nan=0.0, posinf=FLOAT32_MAX, neginf=-FLOAT32_MAX)
        if worst is not None:
            packed = torch.where(worst & ~staging.isfinite(), FLOAT32_MAX, packed)
        if vector is not None:
            extra = vector.detach().reshape(-1).to(device=device, dtype=torch.float32)
            packed = torch.cat([packed, torch.nan_to_num(extra, nan=0.0, posinf=FLOAT32_MAX, neginf=-FLOAT32_MAX)])
        if distributed and dist.is_available() and dist.is_initialized():
            dist.all_reduce(packed, op=dist.ReduceOp.MAX)
        host = packed.tolist()  # the single host sync of the step
        named = {name: value * sign for (name, _), sign, value in zip(self.fields, self._signs, host, strict=False)}
        return named, host[len(self.fields) :]

    def _read_locally(self, values: dict[str, Tensor | float]) -> dict[str, float] | None:
        """Without a collective: the tensor values in one ``stack`` and one host read, the Python floats on the
        host, each value as the packed float32 vector carries it (NaN 0, +-Inf +-``FLOAT32_MAX``), bit for bit
        what :meth:`reduce` returns through the staging vector. ``None`` when the tensors live on several
        devices (the staging vector copies across them)."""
        tensors = [value for value in (values[name] for name, _ in self.fields) if isinstance(value, Tensor)]
        host: list[float] = []
        if tensors:
            device = tensors[0].device
            if any(t.device != device for t in tensors):
                return None
            packed = torch.stack([t if t.dim() == 0 else t.reshape(()) for t in tensors])
            if packed.dtype != torch.float32:
                packed = packed.to(torch.float32)
            host = packed.tolist()  # the single host sync of the step
        reduced: dict[str, float] = {}
        position = 0
        for (name, _), sign, worst in zip(self.fields, self._signs, self._worst, strict=True):
            value = values[name]
            if isinstance(value, Tensor):
                number = host[position]
                position += 1
            else:
                number = _as_float32(float(value))
            if worst and not math.isfinite(number):
                number = FLOAT32_MAX
            elif math.isnan(number):
                number = 0.0 * sign
            elif math.isinf(number):
                number = math.copysign(FLOAT32_MAX, number)
            reduced[name] = number
        return reduced


FLOAT32_MAX = float(torch.finfo(torch.float32).max)
"""Stand-in for +Inf in a reduced vector."""


_FLOAT32 = struct.Struct("f")


def _as_float32(value: float) -> float:
    """``value`` rounded to float32 as a float32 tensor stores it (+-Inf beyond the float32 range)."""
    try:
        return _FLOAT32.unpack(_FLOAT32.pack(value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)


def _median(values: list[float]) -> float:
    return _median_of_sorted(sorted(values))


def _median_of_sorted(ordered: list[float]) -> float:
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else 0.5 * (ordered[middle - 1] + ordered[middle])


def _safe_log(norm: float) -> float:
    return math.log(max(norm, 1e-30))
