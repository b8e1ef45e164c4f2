"""The logit watch's two findings: attention logit growth and output logit divergence, from its measured history.

Both rules read host values (the recorded steps, and per step the max attention logit of each layer or the
output log-partition) and find a sustained trend only, never one batch; their thresholds
(:func:`growth_logit_level`, :data:`GROWTH_FACTOR`, :data:`Z_LOSS_DRIFT`) and why are documented on each.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from lightning_gradstab.report import Finding

SOFTMAX_MASS = 0.999
"""The attention weight at which a query's softmax counts as one-hot (entropy collapsed)."""

BF16_RESOLUTION_LOGIT = 256.0
"""``2**8``: above this magnitude bfloat16's 8-bit significand spaces representable logits 1 nat or more apart
(``256 * 2**-8``), so the attention weights are set by rounding, in steps of ``e``."""

GROWTH_FACTOR = 2.0
"""Rise of the max attention logit from the first to the last third of the watched window that counts as still
growing (a doubling) rather than settled."""

Z_LOSS_DRIFT = 20.0
"""Drift of the mean log-partition (nats) that counts as output logit divergence; see :func:`output_logit_findings`."""


def collapse_logit(seq_len: int) -> float:
    """The logit gap at which one key takes ``SOFTMAX_MASS`` of a query's attention against ``seq_len - 1`` keys at
    logit 0: ``log((T - 1) * m / (1 - m))``; 11.0 at T = 64, 14.5 at T = 2048. Above it the softmax is one-hot and
    its gradient (``p (1 - p)``) is below 1e-3: Dehghani et al.'s attention entropy collapse.

    Example::

        round(collapse_logit(64), 1)  # 11.0
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"`seq_len` must be an int >= 2, got {seq_len!r}")
    return math.log((seq_len - 1) * SOFTMAX_MASS / (1.0 - SOFTMAX_MASS))


def growth_logit_level(seq_len: int) -> float:
    """The max attention logit above which growth is named: ``max(collapse_logit(T), 256)``.

    A single sharp head (an induction or previous-token head) is one-hot by design, so the one-hot level alone
    (11 at T = 64) would name healthy models; 256 is where the logits leave the range any attention pattern
    needs (every query one-hot for ``T`` up to ``e**256``) and where bfloat16 attention can no longer tell
    logits 1 nat apart (:data:`BF16_RESOLUTION_LOGIT`). Wortsman et al. 2023 see the unstable runs' max logits
    reach 1e3-1e4 and the stable ones stay far below (their attention-logit figures).

    Example::

        growth_logit_level(64)  # 256.0
    """
    return max(collapse_logit(seq_len), BF16_RESOLUTION_LOGIT)


def attention_logit_findings(
    layers: Sequence[str],
    qk_normalized: Sequence[bool],
    steps: Sequence[int],
    max_logits: Sequence[Sequence[float]],
    seq_len: int,
    growth_factor: float = GROWTH_FACTOR,
) -> list[Finding]:
    """``attention.logit_growth`` for the layers whose max attention logit grew into softmax saturation.

    A layer is named when (a) its last three measurements (a sustained level, not one batch) are all at or above
    :func:`growth_logit_level` and (b) the median of the last third of its measurements is at least
    ``growth_factor`` (2x) the median of the first third: still growing over the run, the trend Dehghani et al.
    2023 ("grow without bound") and Wortsman et al. 2023 (max attention logit against steps) saw before
    divergence, where a stable run's logits settle. Layers with a qk-norm are never named: they already have the
    fix. Non-finite measurements are skipped; fewer than six finite ones name nothing.

    Example::

        attention_logit_findings(["attn"], [False], list(range(6)), [[1.0], [50], [100], [300], [600], [900]], 64)
    """
    level = growth_logit_level(seq_len)
    named, evidence = [], {}
    for column, (layer, normalized) in enumerate(zip(layers, qk_normalized, strict=True)):
        series = [(s, row[column]) for s, row in zip(steps, max_logits, strict=True) if math.isfinite(row[column])]
        if normalized or len(series) < 6:
            continue
        values = [value for _, value in series]
        third = len(values) // 3
        early, late = _median(values[:third]), _median(values[-third:])
        if min(values[-3:]) >= level and late >= growth_factor * early:
            named.append(layer)
            evidence[layer] = {"early_max_logit": round(early, 4), "late_max_logit": round(late, 4),
                               "last_max_logit": round(values[-1], 4), "last_step": series[-1][0]}
    if not named:
        return []
    worst = max(evidence.values(), key=lambda e: e["last_max_logit"])
    return [Finding(
        "attention.logit_growth", "warning", tuple(named),
        {"max_attention_logit": worst["last_max_logit"], "early_max_attention_logit": worst["early_max_logit"],
         "level": level, "one_hot_logit": round(collapse_logit(seq_len), 2), "seq_len": seq_len,
         "layers": evidence},
        f"The max attention logit of {len(named)} layer(s) kept growing, to {worst['last_max_logit']:.3g} (from "
        f"{worst['early_max_logit']:.3g} early on; a softmax is one-hot from {collapse_logit(seq_len):.3g}): add "
        "qk-layernorm, a LayerNorm on the queries and keys before their dot product (Dehghani et al. 2023; "
        "Wortsman et al. 2023), or lower the learning rate.",
    )]


def capped_logit_findings(
    caps: Mapping[str, Mapping[str, float]], seq_len: int, already_named: Sequence[str] = ()
) -> list[Finding]:
    """``attention.logit_growth`` for the layers whose logits an ``ExplosionGuard`` kept capping (QK-clip).

    A capped layer's logits cannot show the trend :func:`attention_logit_findings` reads (the cap holds them at
    ~100), so the guard's own record is the evidence: a layer is named when its logits reached
    :func:`growth_logit_level` before a rescale (the level from which the watch names growth) and were rescaled
    on at least three measured steps (sustained, not one batch). ``caps``: ``{layer: {"capped_steps": n,
    "max_logit": x}}`` (:meth:`~lightning_gradstab.ExplosionGuard.attention_logit_caps`); layers in
    ``already_named`` are left to the watch's finding.

    Example::

        capped_logit_findings({"blocks.0.attention": {"capped_steps": 40, "max_logit": 373.0}}, seq_len=64)
    """
    level = growth_logit_level(seq_len)
    named = {
        layer: record for layer, record in caps.items()
        if layer not in already_named and record["capped_steps"] >= 3 and record["max_logit"] >= level
    }
    if not named:
        return []
    worst = max(record["max_logit"] for record in named.values())
    steps = sum(int(record["capped_steps"]) for record in named.values())
    return [Finding(
        "attention.logit_growth", "warning", tuple(named),
        {"max_attention_logit": round(worst, 4), "level": level, "capped_by_guard": True,
         "capped_layer_steps": steps, "layers": {layer: dict(record) for layer, record in named.items()}},
        f"The max attention logit of {len(named)} layer(s) grew to {worst:.3g} and the guard's QK-clip had to "
        f"rescale it back to its cap on {steps} layer-steps: add qk-layernorm, a LayerNorm on the queries and keys "
        "before their dot product (Dehghani et al. 2023; Wortsman et al. 2023), or lower the learning rate.",
    )]


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else math.nan


def output_logit_findings(
    steps: Sequence[int], log_partition: Sequence[float], drift: float = Z_LOSS_DRIFT
) -> list[Finding]:
    """``output.logit_divergence`` when the output log-partition drifted far from where it started and stayed there.

    The cross-entropy is invariant to adding a constant to every logit, so nothing pins ``log Z`` and at a high
    learning rate it can drift; Wortsman et al. 2023 show the loss then diverges, which PaLM's z-loss prevents by
    pulling ``log Z`` to 0. Named when ``|log Z - log Z_first|`` is at least ``drift`` (20 nats) at each of the
    last three measurements and in the median of the last third (sustained, not one batch). Why 20 nats: at that
    size the logits are at least ~20 in magnitude, where bfloat16's 8-bit significand resolves them only to ~0.08,
    the size of a late-training loss improvement, and ``softmax`` needs the max subtracted to stay finite in
    half precision; a model with z-loss keeps ``log Z`` within a few nats of 0. Fewer than six finite
    measurements name nothing.

    Example::

        output_logit_findings(list(range(6)), [4.5, -2.0, -10.0, -20.0, -30.0, -40.0])
    """
    series = [(s, z) for s, z in zip(steps, log_partition, strict=True) if math.isfinite(z)]
    if len(series) < 6:
        return []
    first = series[0][1]
    drifts = [abs(z - first) for _, z in series]
    if min(drifts[-3:]) < drift or _median(drifts[-(len(drifts) // 3):]) < drift:
        return []
    return [Finding(
        "output.logit_divergence", "warning", (),
        {"log_partition_first": round(first, 4), "log_partition_last": round(series[-1][1], 4),
         "drift_nats": round(drifts[-1], 4), "first_step": series[0][0], "last_step": series[-1][0]},
        f"The output logits' log-partition drifted {drifts[-1]:.3g} nats from {first:.3g} and stayed away: add "
        "a z-loss, 1e-4 * logsumexp(logits)^2 (Chowdhery et al. 2022, PaLM; Wortsman et al. 2023), or use weight "
        "decay / a lower learning rate.",
    )]
