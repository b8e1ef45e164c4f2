"""Findings of the diagnosis and their renderings: a rich console table, Markdown and JSON; the console helper.

A :class:`Finding` names a cause of unstable gradients with a stable machine-readable ``code``, the modules
involved, the measured evidence and one sentence saying what to change where. A :class:`Report` collects the
findings of one diagnosis (``diagnose``, ``InitAudit`` or ``ArchitectureAdvisor``) together with the
per-layer measurements they were derived from. The JSON fields are documented in ``docs/diagnosis.md``.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

Severity = Literal["info", "warning", "error"]
"""How bad a finding is: ``error`` blocks training in practice, ``warning`` slows it, ``info`` is context."""

SEVERITIES: tuple[str, ...] = ("info", "warning", "error")

SCHEMA_VERSION = 1
"""Version of the JSON layout written by :meth:`Report.to_dict`; bumped when a documented field changes."""

CODES: dict[str, str] = {
    "init.scale": "weight scale does not match the activation that consumes the layer's output",
    "init.symmetric": "constant or identical rows of weights: the layer's units cannot become different",
    "signal.vanishing": "backpropagated activation gradients shrink toward the input",
    "signal.exploding": "backpropagated activation gradients grow toward the input, or training spiked",
    "activation.saturated": "many sigmoid/tanh units sit in their flat tails, where the derivative is ~0",
    "activation.dead": "many ReLU units output zero for the whole batch and receive no gradient",
    "arch.normalization": "a deep stack without normalization layers shows unstable signal propagation",
    "arch.residual": "a deep plain stack without skip connections (degrades even when gradients look healthy)",
    "arch.activation": "hidden sigmoid activations: non-zero-mean outputs and slope <= 1/4 starve gradients",
    "arch.recurrent": "a vanilla RNN whose recurrent weights explode or vanish over the sequence",
    "embedding.scale": "tiny embeddings feeding a pre-normalization residual stream",
    "attention.logit_growth": "attention logits keep growing far past a one-hot softmax (add qk-layernorm)",
    "output.logit_divergence": "the output logits' log-partition drifts away and keeps moving (add z-loss)",
    "optimizer.adaptive": "under plain SGD one learning rate cannot move every layer and the loss stalls (use Adam)",
    "optimizer.weight_decay": "without weight decay the weights grow with their gradients while the loss stalls",
    "trace.incomplete": "part of the model could not be traced; rules that need the graph skipped it",
}
"""Every finding code with a one-line meaning (the reference table in ``docs/diagnosis.md`` mirrors it)."""

FINDING_FIELDS: tuple[str, ...] = ("code", "severity", "modules", "evidence", "recommendation")
REPORT_FIELDS: tuple[str, ...] = (
    "schema_version",
    "source",
    "model",
    "findings",
    "layers",
    "activations",
    "notes",
)
LAYER_FIELDS: tuple[str, ...] = (
    "name",
    "kind",
    "activation",
    "normalized",
    "fan_in",
    "fan_out",
    "weight_std",
    "recommended_init",
    "recommended_std",
    "output_mean",
    "output_std",
    "grad_rms",
    "delta_growth",
)
ACTIVATION_FIELDS: tuple[str, ...] = ("name", "op", "hidden", "dead_fraction", "saturated_fraction")
"""The documented JSON fields of a report, a finding, a per-layer and a per-activation row (tests check the docs
against them)."""


@dataclass(frozen=True)
class Finding:
    """One diagnosed cause of unstable gradients, with the evidence and the fix.

    Attributes:
        code: stable identifier from :data:`CODES`, e.g. ``"init.scale"``.
        severity: ``"info"``, ``"warning"`` or ``"error"``.
        modules: qualified names of the modules concerned (``model.named_modules()`` names).
        evidence: the measured numbers behind the finding (JSON-serialisable scalars, strings or lists).
        recommendation: one sentence naming what to change where.

    Example::

        Finding("init.symmetric", "error", ("net.2",), {"row_spread": 0.0}, "Re-initialise net.2 randomly.")
    """

    code: str
    severity: Severity
    modules: tuple[str, ...]
    evidence: Mapping[str, Any]
    recommendation: str

    def __post_init__(self) -> None:
        if self.code not in CODES:
            raise ValueError(f"`code` must be one of {sorted(CODES)}, got {self.code!r}")
        if self.severity not in SEVERITIES:
            raise ValueError(f"`severity` must be one of {SEVERITIES}, got {self.severity!r}")
        if isinstance(self.modules, str) or not all(isinstance(m, str) for m in self.modules):
            raise TypeError(f"`modules` must be a sequence of module names, got {self.modules!r}")
        if not isinstance(self.recommendation, str) or not self.recommendation:
            raise ValueError(f"`recommendation` must be a non-empty sentence, got {self.recommendation!r}")
        object.__setattr__(self, "modules", tuple(self.modules))
        object.__setattr__(self, "evidence", dict(self.evidence))

    def to_dict(self) -> dict[str, Any]:
        """The finding as plain JSON-ready values (non-finite floats become the strings ``"inf"``/``"nan"``)."""
        return {
            "code": self.code,
            "severity": self.severity,
            "modules": list(self.modules),
            "evidence": _json_ready(dict(self.evidence)),
            "recommendation": self.recommendation,
        }


@dataclass
class Report:
    """The findings of one diagnosis and the per-layer measurements behind them.

    Attributes:
        findings: what was found, most severe first.
        layers: one row per parameterised layer with the fields of :data:`LAYER_FIELDS`.
        activations: one row per probed ReLU/sigmoid/tanh call with the fields of :data:`ACTIVATION_FIELDS`.
        model: the model's class name.
        source: who produced it: ``"diagnose"``, ``"InitAudit"`` or ``"ArchitectureAdvisor"``.
        notes: actions taken (e.g. layers re-initialised by ``InitAudit(fix=True)``).

    Example::

        report = diagnose(model, torch.randn(32, 64))
        report.print()
        if report.has_errors:
            ...
    """

    findings: list[Finding] = field(default_factory=list)
    layers: list[dict[str, Any]] = field(default_factory=list)
    activations: list[dict[str, Any]] = field(default_factory=list)
    model: str = ""
    source: str = "diagnose"
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        rank = {severity: index for index, severity in enumerate(SEVERITIES)}
        self.findings = sorted(self.findings, key=lambda f: -rank[f.severity])

    @property
    def has_errors(self) -> bool:
        """Whether any finding has severity ``error`` (the CLI exits non-zero then)."""
        return any(f.severity == "error" for f in self.findings)

    @property
    def codes(self) -> set[str]:
        """The set of finding codes present, for quick assertions: ``"init.scale" in report.codes``."""
        return {f.code for f in self.findings}

    def by_code(self, code: str) -> list[Finding]:
        """The findings with ``code`` (empty if none)."""
        if code not in CODES:
            raise ValueError(f"`code` must be one of {sorted(CODES)}, got {code!r}")
        return [f for f in self.findings if f.code == code]

    def to_dict(self) -> dict[str, Any]:
        """The report as the documented JSON object (see ``docs/diagnosis.md``)."""
        return {
            "schema_version": SCHEMA_VERSION,
            "source": self.source,
            "model": self.model,
            "findings": [f.to_dict() for f in self.findings],
            "layers": [_json_ready({key: row.get(key) for key in LAYER_FIELDS}) for row in self.layers],
            "activations": [
                _json_ready({key: row.get(key) for key in ACTIVATION_FIELDS}) for row in self.activations
            ],
            "notes": list(self.notes),
        }

    def to_json(self) -> str:
        """The report as strict JSON text (no NaN/Infinity literals)."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    def write_json(self, path: str | Path) -> Path:
        """Write :meth:`to_json` to ``path`` (parent folders created) and return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n")
        return path

    def to_markdown(self) -> str:
        """Markdown for TensorBoard's Text tab and for pasting into an issue.

        The table holds only short columns (severity, code, modules), so it reads at a normal browser width;
        the evidence and the fix of each finding follow it as text (long cells in a Markdown table wrap letter
        by letter in TensorBoard).
        """
        title = f"### Gradient stability findings: {self.model or 'model'} ({self.source})"
        if not self.findings:
            lines = [title, "", "No findings: initialisation, signal propagation and architecture look healthy."]
        else:
            lines = [title, "", "| # | severity | code | modules |", "|---|---|---|---|"]
            for index, f in enumerate(self.findings, 1):
                cells = [str(index), f"**{f.severity}**", f"`{f.code}`", _short_modules(f.modules)]
                lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
            for index, f in enumerate(self.findings, 1):
                lines += ["", f"**{index}. `{f.code}`** ({f.severity}): {f.recommendation}"]
                if f.evidence:
                    lines += ["", f"evidence: {_short_evidence(f.evidence)}"]
        if self.notes:
            lines.append("")
        lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines)

    def to_rich_table(self) -> Any:
        """A ``rich.table.Table`` of the findings (severity colour-coded) that wraps to the console's width.

        Three columns: the finding (severity over code, never wrapped), the modules, and the recommendation
        followed by the evidence, which take the remaining width and wrap between words.
        """
        from rich.table import Table

        table = Table(title=f"Gradient stability: {self.model or 'model'} ({self.source})", show_lines=True)
        table.add_column("finding", no_wrap=True)
        table.add_column("modules", ratio=1, min_width=12)
        table.add_column("recommendation, then evidence", ratio=3, min_width=30)
        for f in self.findings:
            evidence = _short_evidence(f.evidence)
            table.add_row(
                f"[{_COLOURS[f.severity]}]{f.severity}[/]\n{f.code}",
                _short_modules(f.modules),
                _escape(f.recommendation) + (f"\n[dim]{_escape(evidence)}[/]" if evidence != "-" else ""),
            )
        return table

    def _stacked(self) -> list[Any]:
        """The narrow-terminal form: per finding a heading line, then the fix and the evidence, indented."""
        from rich.padding import Padding
        from rich.text import Text

        shown: list[Any] = [Text(f"Gradient stability: {self.model or 'model'} ({self.source})", style="bold")]
        for f in self.findings:
            heading = Text.assemble((f.severity, _COLOURS[f.severity]), " ", (f.code, "bold"), " ",
                                    _short_modules(f.modules))
            shown += [heading, Padding(Text(f.recommendation), (0, 0, 0, 2), expand=False)]
            if f.evidence:
                shown.append(Padding(Text(_short_evidence(f.evidence), style="dim"), (0, 0, 0, 2), expand=False))
        return shown

    def to_lines(self, width: int = 160) -> list[str]:
        """The compact form for logs and CI: a title, then one line per finding (continued, indented, past
        ``width`` characters), then the notes. No colour codes, no box drawing."""
        import textwrap

        title = f"Gradient stability: {self.model or 'model'} ({self.source})"
        if not self.findings:
            lines = [f"{title}: no findings."]
        else:
            lines = [f"{title}: {len(self.findings)} finding{'s' if len(self.findings) > 1 else ''}"]
            for f in self.findings:
                text = f"  {f.severity} {f.code} [{_short_modules(f.modules)}] {_short_evidence(f.evidence)}"
                lines += textwrap.wrap(f"{text} -> {f.recommendation}", width, subsequent_indent="      ",
                                       break_long_words=True, break_on_hyphens=False)
        for note in self.notes:
            lines += textwrap.wrap(f"- {note}", width, subsequent_indent="  ")
        return lines

    def __rich_console__(self, console: Any, options: Any) -> Any:
        """Rich protocol: on a terminal the table (the stacked form below :data:`NARROW_WIDTH` columns), else
        the compact lines of :meth:`to_lines`."""
        from rich.text import Text

        if not console.is_terminal:
            for line in self.to_lines(options.max_width):
                yield Text(line, no_wrap=True, overflow="fold")
            return
        if self.findings and options.max_width >= NARROW_WIDTH:
            yield self.to_rich_table()
        elif self.findings:
            yield from self._stacked()
        else:
            yield f"Gradient stability: no findings for {self.model or 'model'} ({self.source})."
        for note in self.notes:
            yield f"- {note}"

    def renderables(self) -> list[Any]:
        """What :meth:`print` shows: the report itself (a Rich renderable: table or compact lines)."""
        return [self]

    def print(self, console: Any = None, *, trainer: Any = None) -> None:
        """Print the findings table (and notes) to ``console``, or through :func:`console_print` if None.

        Pass ``trainer`` when printing during ``fit``, so that Lightning's progress bar does not draw over it.
        """
        if console is not None:
            for renderable in self.renderables():
                console.print(renderable)
        else:
            console_print(*self.renderables(), trainer=trainer)


def _short_modules(modules: Sequence[str], shown: int = 4) -> str:
    if len(modules) <= shown:
        return ", ".join(modules) or "-"
    return f"{', '.join(modules[:2])}, …, {modules[-1]} ({len(modules)} modules)"


def _short_evidence(evidence: Mapping[str, Any]) -> str:
    parts = []
    for key, value in evidence.items():
        if isinstance(value, (list, tuple)):
            value = f"[{len(value)} values]" if len(value) > 4 else ", ".join(_format(v) for v in value)
        parts.append(f"{key}={_format(value)}")
    return "; ".join(parts) or "-"


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


NARROW_WIDTH = 100
"""Below this many columns a terminal gets the findings stacked (heading, fix, evidence) instead of a table."""


_COLOURS = {"info": "cyan", "warning": "yellow", "error": "bold red"}


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _json_ready(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value


MAX_PLAIN_WIDTH = 160
"""Widest line :func:`console_print` writes when the output is not a terminal (a CI log, a file): longer rows
wrap inside their cells, findings take the compact one-line form of :meth:`Report.to_lines`."""

Verbosity = Literal["normal", "quiet"]
VERBOSITY_ENV = "GRADSTAB_VERBOSITY"
"""Environment variable read when :func:`set_verbosity` was not called: ``quiet`` or ``normal`` (inherited by
DDP ranks and Hydra jobs, so one setting covers every process of a run)."""

_verbosity: Verbosity | None = None


def set_verbosity(level: Verbosity) -> Verbosity:
    """The one switch for what the suite prints; returns the previous level.

    ``"quiet"``: the four callbacks and ``gradstab audit`` still log their scalars, images and text to the
    loggers and write their report files, but print nothing (no tables, no end-of-fit summary). ``"normal"``
    (the default) prints them. Without a call, the ``GRADSTAB_VERBOSITY`` environment variable decides;
    ``gradstab audit --quiet`` sets it for the CLI.

    Example::

        from lightning_gradstab import set_verbosity

        set_verbosity("quiet")  # e.g. in a sweep: everything goes to TensorBoard and the JSON files
    """
    global _verbosity
    if level not in ("normal", "quiet"):
        raise ValueError(f"`level` must be 'normal' or 'quiet', got {level!r}")
    previous = get_verbosity()
    _verbosity = level
    return previous


def get_verbosity() -> Verbosity:
    """The level :func:`set_verbosity` set, else ``GRADSTAB_VERBOSITY`` (``quiet``/``normal``), else ``normal``."""
    if _verbosity is not None:
        return _verbosity
    import os

    value = os.environ.get(VERBOSITY_ENV, "normal").strip().lower() or "normal"
    if value not in ("normal", "quiet"):
        raise ValueError(f"environment variable {VERBOSITY_ENV} must be 'normal' or 'quiet', got {value!r}")
    return value  # type: ignore[return-value]


def console_print(*renderables: Any, trainer: Any = None, stream: Any = None) -> None:
    """Print rich renderables (tables, strings with markup) so that Lightning's progress bar cannot draw over them.

    Every table of the suite goes through here, and nothing is printed at verbosity ``quiet``
    (:func:`set_verbosity`). On a terminal the output wraps to the terminal's width (cells wrap between
    words); piped or redirected to a file, lines are at most :data:`MAX_PLAIN_WIDTH` characters, findings one
    line each, with no colour codes. While ``trainer`` shows a progress bar:

    - ``RichProgressBar``: printed through Rich's global console, the one the bar's live display draws on,
      which keeps the bar below the printed lines instead of redrawing over them;
    - ``TQDMProgressBar`` (or any tqdm bar): written with ``tqdm.write``, which clears the bars, writes the
      lines and redraws the bars under them.

    Example::

        console_print(report.to_rich_table(), "[bold]next:[/] model.init=he", trainer=trainer)
    """
    if get_verbosity() == "quiet":
        return
    stream = stream or sys.stdout
    bar = _progress_bar(trainer)
    terminal = _is_terminal(stream)
    if bar == "rich" and terminal and stream is sys.stdout:
        from rich import get_console

        for renderable in renderables:
            get_console().print(renderable)
        return
    text = render_text(*renderables, terminal=terminal)
    if bar == "tqdm":
        from tqdm import tqdm

        tqdm.write(text.rstrip("\n"), file=stream)
    else:
        stream.write(text)
        stream.flush()


def render_text(*renderables: Any, terminal: bool, width: int | None = None) -> str:
    """Render to text: for a terminal with colours at ``width`` (default: the terminal's), else plain, as wide
    as the widest row needs up to ``width`` (default :data:`MAX_PLAIN_WIDTH`), findings in their compact form."""
    from rich.console import Console
    from rich.measure import Measurement

    if terminal:
        width = width or shutil.get_terminal_size(fallback=(120, 24)).columns
    console = Console(
        file=io.StringIO(),
        width=width or MAX_PLAIN_WIDTH,
        force_terminal=terminal,
        color_system="auto" if terminal else None,
        highlight=False,
        soft_wrap=False,
    )
    for renderable in renderables:
        if not terminal:
            natural = Measurement.get(console, console.options, console.render_str(renderable)
                                      if isinstance(renderable, str) else renderable).maximum
            console.print(renderable, width=max(1, min(natural, width or MAX_PLAIN_WIDTH)))
        else:
            console.print(renderable)
    text = cast(io.StringIO, console.file).getvalue()  # the StringIO the console was given above
    return text if terminal else "".join(line.rstrip() + "\n" for line in text.splitlines())


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _progress_bar(trainer: Any) -> str | None:
    """``"rich"`` or ``"tqdm"`` when ``trainer`` shows Lightning's Rich or TQDM progress bar, else None."""
    bar = getattr(trainer, "progress_bar_callback", None) if trainer is not None else None
    if bar is None or not getattr(bar, "is_enabled", False):
        return None
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    if isinstance(bar, RichProgressBar):
        return "rich"
    if isinstance(bar, TQDMProgressBar):
        return "tqdm"
    return None


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
    guard_summaries: Sequence[Mapping[str, Any]] = (),
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
        guard_summaries: ``ExplosionGuard.summary()`` of each guard.
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
    stopped = [g["stop_reason"] for g in guard_summaries if g.get("stopped")]
    guard_advice: list[str] = []
    for guard in guard_summaries:
        for entry in guard.get("optimizers", {}).values():
            for name, count in entry.get("counts", {}).items():
                counts[name] = counts.get(name, 0) + int(count)
            guard_advice += [line for line in entry.get("advice", ()) if line not in guard_advice]
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
        entry = f"[{_COLOURS[finding.severity]}]{finding.code}[/] ({finding.severity}{done})"
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
