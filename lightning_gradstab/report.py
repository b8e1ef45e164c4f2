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
from typing import Any, Literal

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
        """A Markdown table for the TensorBoard text panel and for pasting into an issue."""
        title = f"### Gradient stability findings: {self.model or 'model'} ({self.source})"
        if not self.findings:
            lines = [title, "", "No findings: initialisation, signal propagation and architecture look healthy."]
        else:
            lines = [title, "", "| severity | code | modules | evidence | recommendation |", "|---|---|---|---|---|"]
            for f in self.findings:
                cells = [f.severity, f"`{f.code}`", _short_modules(f.modules), _short_evidence(f.evidence)]
                cells.append(f.recommendation)
                lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
        lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines)

    def to_rich_table(self) -> Any:
        """A ``rich.table.Table`` of the findings (severity colour-coded)."""
        from rich.table import Table

        table = Table(title=f"Gradient stability: {self.model or 'model'} ({self.source})", show_lines=True)
        for column in ("severity", "code", "modules", "evidence", "recommendation"):
            table.add_column(column, overflow="fold")
        colours = {"info": "cyan", "warning": "yellow", "error": "bold red"}
        for f in self.findings:
            table.add_row(
                f"[{colours[f.severity]}]{f.severity}[/]",
                f.code,
                _short_modules(f.modules),
                _short_evidence(f.evidence),
                f.recommendation,
            )
        return table

    def renderables(self) -> list[Any]:
        """What :meth:`print` shows: the findings table (or a one-line "no findings"), then the notes."""
        shown: list[Any] = [
            self.to_rich_table()
            if self.findings
            else f"Gradient stability: no findings for {self.model or 'model'} ({self.source})."
        ]
        return shown + [f"- {note}" for note in self.notes]

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


MAX_PLAIN_WIDTH = 400
"""Widest line :func:`console_print` writes when the output is not a terminal (rows are never wrapped below it)."""


def console_print(*renderables: Any, trainer: Any = None, stream: Any = None) -> None:
    """Print rich renderables (tables, strings with markup) so that Lightning's progress bar cannot draw over them.

    Every table of the suite goes through here. On a terminal the output wraps to the terminal's width; piped
    or redirected to a file, each row stays on one line (up to :data:`MAX_PLAIN_WIDTH` characters), with no
    colour codes. While ``trainer`` shows a progress bar:

    - ``RichProgressBar``: printed through Rich's global console, the one the bar's live display draws on,
      which keeps the bar below the printed lines instead of redrawing over them;
    - ``TQDMProgressBar`` (or any tqdm bar): written with ``tqdm.write``, which clears the bars, writes the
      lines and redraws the bars under them.

    Example::

        console_print(report.to_rich_table(), "[bold]next:[/] model.init=he", trainer=trainer)
    """
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
    """Render to text: for a terminal with colours at ``width`` (default: the terminal's), else plain and as
    wide as the widest row needs, so that a table piped to a file is never wrapped into unreadable cells."""
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
        if not terminal and width is None:
            natural = Measurement.get(console, console.options, console.render_str(renderable)
                                      if isinstance(renderable, str) else renderable).maximum
            console.print(renderable, width=max(1, min(natural, MAX_PLAIN_WIDTH)))
        else:
            console.print(renderable)
    text = console.file.getvalue()
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
) -> list[Any]:
    """The one summary printed at the end of a fit: what the suite found, what the guard did, what to do next.

    Args:
        reports: the ``InitAudit`` / ``ArchitectureAdvisor`` reports of the fit.
        guard_summaries: ``ExplosionGuard.summary()`` of each guard.
        next_steps: advice by finding code (and :data:`GUARD_STOPPED`, :data:`GUARD_INTERVENED`) in the terms
            of how the user runs, e.g. ``{"init.scale": "rerun with model.init=he"}`` from a Hydra example;
            codes without an entry get the finding's own recommendation.
        files: report files written, listed so the user knows where the details are.
        max_steps_shown: at most this many distinct suggestions, most severe first.

    Example::

        console_print(*fit_summary([audit.report], [guard.summary()]), trainer=trainer)
    """
    from rich.table import Table

    next_steps = dict(next_steps or {})
    findings = sorted(
        ((f, r.source) for r in reports for f in r.findings),
        key=lambda pair: -SEVERITIES.index(pair[0].severity),
    )
    counts: dict[str, int] = {}
    stopped = [g["stop_reason"] for g in guard_summaries if g.get("stopped")]
    for guard in guard_summaries:
        for entry in guard.get("optimizers", {}).values():
            for name, count in entry.get("counts", {}).items():
                counts[name] = counts.get(name, 0) + int(count)
    if not findings and not counts and not stopped:
        return ["[green]Gradient stability:[/] no findings, and the guard took no action."
                if guard_summaries else "[green]Gradient stability:[/] no findings."]

    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    colours = {"info": "cyan", "warning": "yellow", "error": "bold red"}
    by_source: dict[str, list[str]] = {}
    for finding, source in findings:
        entry = f"[{colours[finding.severity]}]{finding.code}[/] ({finding.severity})"
        if entry not in by_source.setdefault(source, []):
            by_source[source].append(entry)
    found = "; ".join(f"{source}: {', '.join(entries)}" for source, entries in by_source.items())
    grid.add_row("found", found or "no findings")
    if guard_summaries:
        actions = " ".join(f"{name}={count}" for name, count in sorted(counts.items())) or "no action"
        grid.add_row("guard", actions + (f"; [bold red]stopped:[/] {stopped[0]}" if stopped else ""))
    suggestions: list[str] = []
    if stopped:
        suggestions.append(next_steps.get(GUARD_STOPPED, _GUARD_NEXT_STEPS[GUARD_STOPPED]))
    elif any(counts.get(name) for name in _INTERVENTIONS):
        suggestions.append(next_steps.get(GUARD_INTERVENED, _GUARD_NEXT_STEPS[GUARD_INTERVENED]))
    advised: set[str] = set()
    for finding, _ in findings:
        if finding.code in advised or (finding.severity == "info" and suggestions):
            continue
        advised.add(finding.code)
        suggestion = next_steps.get(finding.code, f"{finding.code}: {finding.recommendation}")
        if suggestion not in suggestions:
            suggestions.append(suggestion)
    for index, suggestion in enumerate(suggestions[:max_steps_shown]):
        grid.add_row("next" if index == 0 else "", f"- {suggestion}")
    if files:
        grid.add_row("details", ", ".join(files))
    return ["[bold]Gradient stability: what this fit found[/]", grid]
