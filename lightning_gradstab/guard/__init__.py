"""The guard's pure-PyTorch core: the policy that turns evidence into decisions, and what it keeps so that a bad
step can be undone.

The Lightning callback, :class:`~lightning_gradstab.callbacks.guard.ExplosionGuard`, is a thin adapter; the
policy and the state it restores live here, one concept per module:

- :mod:`~lightning_gradstab.guard.config`: the rungs, the evidence tables and
  :class:`~lightning_gradstab.guard.config.PolicyConfig`, every option defined once;
- :mod:`~lightning_gradstab.guard.detect`: the evidence: :class:`~lightning_gradstab.guard.detect.Observation`,
  the running statistics and every threshold;
- :mod:`~lightning_gradstab.guard.ladder`: :class:`~lightning_gradstab.guard.ladder.ExplosionPolicy`, evidence
  to :class:`~lightning_gradstab.guard.decision.Decision`, composed of :mod:`~lightning_gradstab.guard.escalation`
  (the ladder), :mod:`~lightning_gradstab.guard.backoff` (the learning-rate multiplier and ceiling),
  :mod:`~lightning_gradstab.guard.snapshot_schedule`, :mod:`~lightning_gradstab.guard.rollback_check` and
  :mod:`~lightning_gradstab.guard.event_log`, over the counters of :mod:`~lightning_gradstab.guard.policy_state`
  (the versioned checkpoint layout);
- :mod:`~lightning_gradstab.guard.snapshot`: :class:`~lightning_gradstab.guard.snapshot.RollbackSnapshot`,
  the copy of weights, optimizer state and loss scale a rollback returns to;
- :mod:`~lightning_gradstab.guard.snapshot_budget`: what a snapshot keeps, where, and how many bytes of host
  RAM and disk it may take;
- :mod:`~lightning_gradstab.guard.snapshot_layout`: how a snapshot's state is laid out (a flat list of tensors
  and a skeleton pointing into it), checked against a model and copied back in place;
- :mod:`~lightning_gradstab.guard.snapshot_disk`: the private, verified file a snapshot spills to;
- :mod:`~lightning_gradstab.guard.step_buffers`: the buffers a forward pass writes, copied before each step so
  that a skipped step leaves no trace in them;
- :mod:`~lightning_gradstab.guard.tuple_snapshot`: the ``state_dict`` tuple snapshot used before
  ``RollbackSnapshot``, kept as the benchmarks' baseline.

Nothing here imports Lightning or the callbacks. The package imports none of its modules up front: import the
one you need (``RollbackSnapshot`` is also ``lightning_gradstab.RollbackSnapshot``).
"""
