"""One recorded step of the forward pass: what the tracer writes and the graph analysis reads.

Nodes are recorded in execution order, so a node's inputs always come before it; every path question of
:mod:`.paths` and every summary of :mod:`.graph` is asked of a list of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass(slots=True)
class Node:
    """One recorded step of the forward pass.

    ``kind`` is ``input``, ``layer``, ``norm``, ``activation``, ``join`` (an add/cat of two traced paths),
    ``pass`` (reshapes, dropout, pooling, scaling by a constant, a gate multiplying the main path) or ``op``
    (anything else). ``side_inputs`` are inputs off the main path (the gate of a Squeeze-Excitation product),
    ``value_inputs`` the value argument of a fused attention call.
    """

    index: int
    kind: str
    name: str
    op: str
    inputs: list[int]
    layer_kind: str | None = None
    scale: float = 1.0  # constant factor a pass node multiplies by (``x * sqrt(d)``)
    negative_slope: float = 0.0
    output: Tensor | None = field(default=None, repr=False)
    input_shape: tuple[int, ...] = ()
    side_inputs: list[int] = field(default_factory=list)
    value_inputs: list[int] = field(default_factory=list)
    mixing_inputs: list[int] = field(default_factory=list)
    """Attention probabilities multiplied with the values (``softmax(q k^T) @ v``): they mix positions of the
    main input, the value, which is the path the signal's depth is counted along."""
    pooling_attention: bool = False
    """A fused attention call whose query does not come from the input signal and has fewer positions than its keys
    (a learned query attending over the sequence: attention pooling, as SigLIP's and AIMv2's heads or the Set
    Transformer's PMA do)."""
    adds_depth: bool = True
    """Every application of a weight is one layer of depth (a module called again, a shared block, a weight
    applied in a loop); only a recurrent cell's calls after the first do not add depth: they are time steps,
    which ``arch.recurrent`` judges."""
    weight: Tensor | None = field(default=None, repr=False)  # the weight a functional layer applied
    fans: tuple[int, int] | None = None  # (fan_in, fan_out) of the op, for functional layers
    global_reduction: bool = False  # pools or selects away every position: (B, C, H, W) -> (B, C), x[:, 0]
    in_branch: bool = False  # a join inside a residual branch (FocalNet's sum over focal levels): not the stream
    signal: bool = True  # carries the input signal (not a constant computation such as a position-bias MLP)
