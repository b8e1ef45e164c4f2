"""Hydra configs shipped with the package, for projects laid out like lightning-hydra-template.

``callbacks/gradstab.yaml`` holds the four suite callbacks with their defaults, in the template's
``configs/callbacks/`` format (one entry per callback, each with a ``_target_``). Put the package on Hydra's
search path and add the file to the callbacks defaults:

.. code-block:: yaml

    # configs/train.yaml
    hydra:
      searchpath:
        - pkg://lightning_gradstab.configs

    # configs/callbacks/default.yaml
    defaults:
      - model_checkpoint
      - gradstab          # GradNormMonitor, ExplosionGuard, InitAudit, ArchitectureAdvisor
      - _self_

or choose it alone on the command line: ``python src/train.py callbacks=gradstab``. Options are overridden
like any other: ``callbacks.gradstab_guard.max_rung=skip``; ``~callbacks.gradstab_advisor`` drops one.
"""

CALLBACKS_CONFIG = "callbacks/gradstab.yaml"
"""The template-style callbacks file, relative to this package."""
