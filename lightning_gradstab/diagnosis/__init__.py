"""Diagnosis of unstable gradients on a real model and batch (pure PyTorch, no Lightning import).

``tracer`` records the dataflow of one forward pass (``ops`` is its vocabulary), ``graph`` analyses its paths,
``probe`` measures activations and backpropagated deltas, ``init_rules``, ``signal_rules`` and ``arch_rules``
turn them into findings, and ``diagnose`` ties them together.

Example::

    from lightning_gradstab.diagnosis import diagnose

    report = diagnose(model, torch.randn(32, 64))
    report.print()
"""

from lightning_gradstab.diagnosis.diagnose import build_report, diagnose, probe_failed_report
from lightning_gradstab.diagnosis.graph import LayerInfo, ModelGraph
from lightning_gradstab.diagnosis.init_rules import InitScheme, recommended_scheme, reinitialize
from lightning_gradstab.diagnosis.probe import ProbeError, ProbeResult, could_not_probe, preserved_state, run_probe
from lightning_gradstab.diagnosis.tracer import trace

__all__ = [
    "InitScheme",
    "LayerInfo",
    "ModelGraph",
    "ProbeError",
    "ProbeResult",
    "build_report",
    "could_not_probe",
    "diagnose",
    "preserved_state",
    "probe_failed_report",
    "recommended_scheme",
    "reinitialize",
    "run_probe",
    "trace",
]
