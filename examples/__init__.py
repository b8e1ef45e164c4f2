"""Hydra-configured example tasks for lightning_gradstab: digits MLP/CNN, Pascanu RNN tasks, a char GPT.

Run ``python examples/train.py`` (see ``docs/examples.md``); the modules here are what ``conf/`` instantiates.
"""
