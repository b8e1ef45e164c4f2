"""Thin Lightning adapters over the suite's core (statistics, policy, diagnosis)."""
