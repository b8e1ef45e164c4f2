"""The one summary printed at the end of a fit: what the suite found, what the guard did, what to do next.

The suite's callbacks hand :func:`fit_summary` their reports, the guard's summaries and the modules
``InitAudit(fix=True)`` re-initialised; the result is printed once per fit through
:func:`~lightning_gradstab.console.console_print`. It is plain data in, Rich renderables out (no Lightning),
so a script can build the same summary, and pass its own advice under :data:`GUARD_STOPPED` and
:data:`GUARD_INTERVENED`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lightning_gradstab.guard.summary import GuardSummary
from lightning_gradstab.report import SEVERITIES, SEVERITY_COLOURS, Finding, Report

GUARD_STOPPED = "guard.stopped"
GUARD_INTERVENED = "guard.intervened"
"""Keys of :func:`fit_summary`'s ``next_steps`` for the guard: it stopped the run / it skipped or rolled back."""

_GUARD_NEXT_STEPS = {
    GUARD_STOPPED: "The guard stopped the run: lower the learning rate or add a warm-up, then rerun; its events "
    "are in gradstab_guard_events.jsonl.",
    GUARD_INTERVENED: "The guard skipped, backed off or rolled back steps: a lower learning rate or a warm-up "
    "avoids the spikes it caught.",
}
_INTERVENTIONS = ("skip", "lr_backoff", "rollback", "stop")


def fit_summary(
    reports: Sequence[Report],
    guard_summaries: Sequence[GuardSummary | Mapping[str, Any]] = (),
    next_steps: Mapping[str, str] | None = None,
    files: Sequence[str] = (),
    max_steps_shown: int = 3,
    *,
    fixed_modules: Sequence[str] = (),
) -> list[Any]:
    """The one summary printed at the end of a fit: what the suite found, what the guard did, what to do next.

    The advice follows what happened in the run: a finding that ``InitAudit(fix=True)`` already repaired is
    reported as done, not as a suggestion; the guard's own advice (e.g. how to clip) comes from what it did;
    each sentence appears once; a fit without ``InitAudit`` or ``ArchitectureAdvisor`` says that no diagnosis
    ran rather than "no findings".

    Args:
        reports: the ``InitAudit`` / ``ArchitectureAdvisor`` reports of the fit (empty: no diagnosis ran).
        guard_summaries: each guard's :class:`~lightning_gradstab.guard.summary.GuardSummary`, or its plain form
            (``ExplosionGuard.summary()``, a summary file's contents).
        next_steps: advice by finding code (and :data:`GUARD_STOPPED`, :data:`GUARD_INTERVENED`) in the terms
            of how the user runs, e.g. ``{"init.scale": "rerun with model.init=he"}`` from a Hydra example;
            codes without an entry get the finding's own recommendation.
        files: report files this fit wrote, listed so the user knows where the details are.
        max_steps_shown: at most this many distinct suggestions, most severe first.
        fixed_modules: the modules ``InitAudit(fix=True)`` re-initialised before the first update. Its
            ``init.*`` findings on them are done, and its signal and activation findings were measured on the
            weights the fix replaced, so neither is advised again.

    Example::

        console_print(*fit_summary([audit.report], [guard.summary()]), trainer=trainer)
    """
    from rich.table import Table

    next_steps = dict(next_steps or {})
    fixed = set(fixed_modules)
    findings = sorted(
        ((f, r.source) for r in reports for f in r.findings),
        key=lambda pair: -SEVERITIES.index(pair[0].severity),
    )
    counts: dict[str, int] = {}
    guards = [g if isinstance(g, GuardSummary) else GuardSummary.from_mapping(g) for g in guard_summaries]
    stopped = [g.stop_reason for g in guards if g.stopped]
    guard_advice: list[str] = []
    for guard in guards:
        for account in guard.optimizers.values():
            for name, count in account.counts.items():
                counts[name] = counts.get(name, 0) + int(count)
            guard_advice += [line for line in account.advice if line not in guard_advice]
    if not findings and not counts and not stopped and not fixed:
        if not reports:
            return ["[green]Gradient stability:[/] the guard took no action (no init audit or advisor ran)."]
        return ["[green]Gradient stability:[/] no findings, and the guard took no action."
                if guard_summaries else "[green]Gradient stability:[/] no findings."]

    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    by_source: dict[str, list[str]] = {}
    for finding, source in findings:
        done = " fixed" if _superseded_by_fix(finding, source, fixed) else ""
        entry = f"[{SEVERITY_COLOURS[finding.severity]}]{finding.code}[/] ({finding.severity}{done})"
        if entry not in by_source.setdefault(source, []):
            by_source[source].append(entry)
    found = "; ".join(f"{source}: {', '.join(entries)}" for source, entries in by_source.items())
    grid.add_row("found", found or ("no findings" if reports else "not run (no InitAudit or ArchitectureAdvisor)"))
    if fixed:
        grid.add_row("done", f"InitAudit(fix=True) re-initialised {_count_layers(len(fixed))} before the first "
                     "update; its findings on the replaced weights need no action")
    if guard_summaries:
        actions = " ".join(f"{name}={count}" for name, count in sorted(counts.items())) or "no action"
        grid.add_row("guard", actions + (f"; [bold red]stopped:[/] {stopped[0]}" if stopped else ""))
    suggestions: list[str] = []
    if stopped:
        suggestions.append(next_steps.get(GUARD_STOPPED, _GUARD_NEXT_STEPS[GUARD_STOPPED]))
    elif any(counts.get(name) for name in _INTERVENTIONS):
        suggestions.append(next_steps.get(GUARD_INTERVENED, _GUARD_NEXT_STEPS[GUARD_INTERVENED]))
    advised: set[str] = set()
    for finding, source in findings:
        if finding.code in advised or (finding.severity == "info" and suggestions):
            continue
        if _superseded_by_fix(finding, source, fixed):
            continue
        advised.add(finding.code)
        suggestions.append(next_steps.get(finding.code, f"{finding.code}: {finding.recommendation}"))
    suggestions += guard_advice
    suggestions = list(dict.fromkeys(suggestions))  # one line per sentence, first place kept
    for index, suggestion in enumerate(suggestions[:max_steps_shown]):
        grid.add_row("next" if index == 0 else "", f"- {suggestion}")
    if files:
        grid.add_row("details", ", ".join(files))
    return ["[bold]Gradient stability: what this fit found[/]", grid]


_MEASURED_BEFORE_FIX = ("signal.vanishing", "signal.exploding", "activation.dead", "activation.saturated")


def _superseded_by_fix(finding: Finding, source: str, fixed: set[str]) -> bool:
    """Whether ``InitAudit(fix=True)`` already acted on ``finding``: an init finding on re-drawn layers, or a
    signal/activation finding the audit measured on the weights it then replaced."""
    if not fixed or source != "InitAudit":
        return False
    if finding.code.startswith("init."):
        return bool(finding.modules) and set(finding.modules) <= fixed
    return finding.code in _MEASURED_BEFORE_FIX


def _count_layers(count: int) -> str:
    return f"{count} layer{'s' if count != 1 else ''}"
