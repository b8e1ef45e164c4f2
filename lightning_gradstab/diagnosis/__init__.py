"""Diagnosis of unstable gradients on a real model and batch (pure PyTorch, no Lightning import).

``tracer`` records the dataflow of one forward pass as ``nodes``: the module hooks (``module_calls``, with the
``module_roles`` they decide at each module's first call) and the function mode (``function_calls``) write one
shared ``recording`` and follow the ``weight_names``; ``ops`` is their vocabulary, ``in_place`` says which calls
write a tensor in place, ``behaviour`` classifies modules by what they compute. ``paths`` answers the questions
asked of the paths and ``graph`` summarises them per layer. ``probe`` measures activations and backpropagated
deltas (``measurements``; the ``model_state`` restored afterwards; ``probe_results``), ``init_rules``,
``signal_rules`` and ``arch_rules`` turn them into findings, and ``diagnose`` ties them together.
``training_rules``, ``optimizer_rules`` and ``weight_decay_rules`` judge what training shows
(``ArchitectureAdvisor`` gathers it): the loss trend, per-layer gradient norms, and whether the optimizer (one
learning rate for every layer, no weight decay) holds it back. (The eager code behind ``torch.compile`` that the
probe runs is :mod:`lightning_gradstab.compiled`.)

Example::

    from lightning_gradstab.diagnosis import diagnose

    report = diagnose(model, torch.randn(32, 64))
    report.print()
"""

from lightning_gradstab.diagnosis.diagnose import build_report, diagnose, probe_failed_report
from lightning_gradstab.diagnosis.graph import LayerInfo, ModelGraph
from lightning_gradstab.diagnosis.init_rules import InitScheme, recommended_scheme, reinitialize
from lightning_gradstab.diagnosis.model_state import preserved_state
from lightning_gradstab.diagnosis.optimizer_rules import adaptive_optimizer_evidence, adaptive_optimizer_findings
from lightning_gradstab.diagnosis.probe import run_probe
from lightning_gradstab.diagnosis.probe_results import ProbeError, ProbeResult, could_not_probe
from lightning_gradstab.diagnosis.tracer import trace
from lightning_gradstab.diagnosis.weight_decay_rules import weight_decay_evidence, weight_decay_findings

__all__ = [
    "InitScheme",
    "LayerInfo",
    "ModelGraph",
    "ProbeError",
    "ProbeResult",
    "adaptive_optimizer_evidence",
    "adaptive_optimizer_findings",
    "build_report",
    "could_not_probe",
    "diagnose",
    "preserved_state",
    "probe_failed_report",
    "recommended_scheme",
    "reinitialize",
    "run_probe",
    "trace",
    "weight_decay_evidence",
    "weight_decay_findings",
]
