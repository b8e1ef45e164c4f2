"""The guard's pure-PyTorch core, one concept per module (no Lightning, no callbacks)."""
