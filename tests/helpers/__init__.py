"""Shared test support: tiny real models and data (``models``), trainer factories (``trainers``) and the
environment of subprocess jobs such as 2-process DDP scripts (``subprocess_env``)."""
