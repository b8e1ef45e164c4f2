"""What the sweep scripts (``hf_sweep.py``, ``timm_sweep.py``, ``diffusers_sweep.py``) write: the machine they
ran on, and each finding of a report as a JSON record."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any


def cpu_name() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (chaotic runs differ between AMD and Intel), else what
    ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def finding_records(report: Any) -> list[dict[str, Any]]:
    """The findings of a ``diagnose`` report as JSON records: code, severity, modules, evidence (numbers, strings
    and flags as they are, anything else as its text) and the recommendation."""
    return [
        {
            "code": f.code,
            "severity": f.severity,
            "modules": list(f.modules),
            "evidence": {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in f.evidence.items()},
            "recommendation": f.recommendation,
        }
        for f in report.findings
    ]


def diagnose_into(row: dict[str, Any], model: Any, batch: Any) -> Any:
    """Run ``diagnose(model, batch)`` and write into ``row`` its seconds (``diagnose_s``) and findings, or the
    exception it raised and its traceback; the report, or None when it raised."""
    import time
    import traceback

    from lightning_gradstab import diagnose

    try:
        start = time.perf_counter()
        report = diagnose(model, batch)
    except Exception as error:
        row["exception"] = f"{type(error).__name__}: {error}"[:300]
        row["traceback"] = traceback.format_exc()[-2000:]
        return None
    row["diagnose_s"] = time.perf_counter() - start
    row["findings"] = finding_records(report)
    return report
