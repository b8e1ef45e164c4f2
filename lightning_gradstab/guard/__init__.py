"""The guard's pure-PyTorch core: what it keeps so that a bad step can be undone.

The Lightning callback, :class:`~lightning_gradstab.callbacks.guard.ExplosionGuard`, is a thin adapter; the
state it restores lives here, one concept per module:

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
