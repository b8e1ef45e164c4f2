"""Report renderings: JSON that validates against the documented fields, Markdown, the rich table."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from rich.console import Console

from lightning_gradstab import Finding, Report, diagnose
from lightning_gradstab.report import ACTIVATION_FIELDS, CODES, FINDING_FIELDS, LAYER_FIELDS, REPORT_FIELDS
from tests.test_diagnose_models import digits_batch, mlp

DOCS = Path(__file__).resolve().parents[1] / "docs" / "diagnosis.md"


def _documented(section: str) -> list[str]:
    """Backticked names in the first column of the table under ``section`` in docs/diagnosis.md."""
    text = DOCS.read_text().split(section, 1)[1]
    rows = re.findall(r"^\| `([^`]+)` \|", text.split("\n#", 1)[0], flags=re.MULTILINE)
    return rows


def _validate(document: dict) -> None:
    """Check a JSON report against the documented fields and types."""
    assert list(document) == _documented("### Report fields")
    assert isinstance(document["schema_version"], int)
    for finding in document["findings"]:
        assert list(finding) == _documented("### Finding fields")
        assert finding["code"] in _documented("## Finding codes")
        assert finding["severity"] in ("info", "warning", "error")
        assert all(isinstance(m, str) for m in finding["modules"])
        assert isinstance(finding["evidence"], dict) and finding["recommendation"].endswith(".")
    for layer in document["layers"]:
        assert list(layer) == _documented("### Layer fields")
    for activation in document["activations"]:
        assert list(activation) == _documented("### Activation fields")


def test_documented_fields_match_the_code():
    assert _documented("### Report fields") == list(REPORT_FIELDS)
    assert _documented("### Finding fields") == list(FINDING_FIELDS)
    assert _documented("### Layer fields") == list(LAYER_FIELDS)
    assert _documented("### Activation fields") == list(ACTIVATION_FIELDS)
    assert _documented("## Finding codes") == list(CODES)


def test_json_of_a_real_report_validates_against_the_documented_fields(tmp_path):
    report = diagnose(mlp(30, 64, init="xavier"), digits_batch())
    path = report.write_json(tmp_path / "nested" / "report.json")
    document = json.loads(path.read_text())
    _validate(document)
    assert {f["code"] for f in document["findings"]} >= {"init.scale", "signal.vanishing"}
    assert len(document["layers"]) == 30 and len(document["activations"]) == 29
    growth = [layer["delta_growth"] for layer in document["layers"][1:-1]]
    assert sum(growth) / len(growth) < 0.9  # each layer shrinks the delta toward the input (~0.71 under Xavier)
    assert document["findings"][0]["severity"] == "error"  # most severe first


def test_non_finite_evidence_becomes_strict_json_strings():
    finding = Finding("signal.exploding", "error", ("net.0",), {"ratio": math.inf, "x": [math.nan]}, "Clip it.")
    document = json.loads(Report([finding]).to_json())
    assert document["findings"][0]["evidence"] == {"ratio": "inf", "x": ["nan"]}


def test_markdown_has_one_row_per_finding_with_code_and_recommendation():
    findings = [
        Finding("init.symmetric", "error", ("net.2",), {"row_spread": 0.0}, "Re-initialise net.2 randomly."),
        Finding("arch.residual", "warning", tuple(f"net.{i}" for i in range(30)), {"plain_depth": 30}, "Add skips."),
    ]
    markdown = Report(findings, model="MLP").to_markdown()
    lines = markdown.splitlines()
    assert lines[0] == "### Gradient stability findings: MLP (diagnose)"
    rows = [line for line in lines if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert rows == ["| 1 | **error** | `init.symmetric` | net.2 |",
                    "| 2 | **warning** | `arch.residual` | net.0, net.1, …, net.29 (30 modules) |"]
    # the long cells follow the table as text, so its columns stay narrow in TensorBoard's Text tab
    assert "**1. `init.symmetric`** (error): Re-initialise net.2 randomly." in lines
    assert "evidence: row_spread=0" in lines and "**2. `arch.residual`** (warning): Add skips." in lines


def test_empty_report_says_healthy():
    assert "No findings" in Report([], model="MLP").to_markdown()


def test_rich_table_prints_every_finding():
    console = Console(record=True, width=200)
    Report([Finding("arch.recurrent", "error", ("rnn",), {"spectral_radius": 1.5}, "Use an LSTM.")]).print(console)
    text = console.export_text()
    assert "arch.recurrent" in text and "spectral_radius=1.5" in text and "Use an LSTM." in text


def test_findings_are_sorted_by_severity_and_queryable_by_code():
    info = Finding("trace.incomplete", "info", (), {}, "Look.")
    error = Finding("init.symmetric", "error", ("a",), {}, "Fix.")
    report = Report([info, error])
    assert report.findings == [error, info] and report.has_errors
    assert report.by_code("init.symmetric") == [error] and report.codes == {"init.symmetric", "trace.incomplete"}


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"code": "init.scales"}, ValueError, "`code` must be one of"),
        ({"severity": "fatal"}, ValueError, "`severity` must be one of"),
        ({"modules": "net.0"}, TypeError, "`modules` must be a sequence of module names"),
        ({"recommendation": ""}, ValueError, "`recommendation` must be a non-empty sentence"),
    ],
)
def test_finding_validation_names_the_argument(kwargs, error, message):
    arguments = {"code": "init.scale", "severity": "warning", "modules": ("a",), "evidence": {},
                 "recommendation": "Fix."}
    with pytest.raises(error, match=message):
        Finding(**{**arguments, **kwargs})
