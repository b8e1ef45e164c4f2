"""Attention- and output-logit watching: the two instabilities Wortsman et al. 2023 reproduce at small scale.

Wortsman et al. 2023 ("Small-scale proxies for large-scale Transformer training instabilities", arXiv 2309.14322)
show two ways a Transformer loses a run at a high learning rate, each with an architectural fix:

- **attention logit growth** (first reported by Dehghani et al. 2023, "Scaling Vision Transformers to 22 Billion
  Parameters"): the query-key logits ``q . k / sqrt(d)`` grow without bound, the softmax becomes one-hot (its
  entropy collapses) and the loss diverges. Fix: qk-layernorm, a LayerNorm (or RMSNorm) on the queries and keys
  before the dot product.
- **output logit divergence**: the cross-entropy does not pin the log-partition ``log Z = logsumexp(logits)`` of
  the output layer, so it drifts far from 0 and the loss becomes unstable. Fix: the z-loss ``1e-4 * log(Z)^2``
  (Chowdhery et al. 2022, PaLM), which Wortsman et al. use at 1e-4.

:class:`~lightning_gradstab.logits.watch.LogitWatch` measures both with forward hooks, only on the steps its owner
switches it on (the advisor does so every ``k`` steps); a measurement stays on the device until the owner asks for
the findings. One concept per module:

- :mod:`~lightning_gradstab.logits.sites`: which modules are the attention layers and the output layer, and how
  their queries and keys are reached;
- :mod:`~lightning_gradstab.logits.watch`: :class:`~lightning_gradstab.logits.watch.LogitWatch`, the hooks that
  measure them;
- :mod:`~lightning_gradstab.logits.rules`: the rules that turn the measurements into findings, with their
  thresholds and why.

The package imports none of its modules up front (``LogitWatch`` is also ``lightning_gradstab.LogitWatch``).

Example::

    watch = LogitWatch(model)           # finds the attention layers and the output layer
    watch.active = True                 # measure the next training forward
    loss = model(batch).loss; watch.record(step=0)
    findings = watch.findings(seq_len=64)
"""
