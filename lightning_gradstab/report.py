"""Findings of the diagnosis and their renderings: a rich console table, compact lines, Markdown and JSON.

A :class:`Finding` names a cause of unstable gradients with a stable machine-readable ``code``, the modules
involved, the measured evidence and one sentence saying what to change where. A :class:`Report` collects the
findings of one diagnosis (``diagnose``, ``InitAudit`` or ``ArchitectureAdvisor``) together with the
per-layer measurements they were derived from. The JSON fields are documented in ``docs/diagnosis.md``.
Printing them (verbosity, terminal width, Lightning's progress bar) is :mod:`lightning_gradstab.console`'s job;
the end-of-fit summary built from several reports is :mod:`lightning_gradstab.fit_summary`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lightning_gradstab.console import console_print

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
                f"[{SEVERITY_COLOURS[f.severity]}]{f.severity}[/]\n{f.code}",
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
            heading = Text.assemble((f.severity, SEVERITY_COLOURS[f.severity]), " ", (f.code, "bold"), " ",
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
        """Print the findings table (and notes) to ``console``, or through
        :func:`~lightning_gradstab.console.console_print` if None.

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


SEVERITY_COLOURS = {"info": "cyan", "warning": "yellow", "error": "bold red"}
"""The Rich style of each severity, in the findings table and the end-of-fit summary."""


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
