"""Evaluation: metrics, attack caches and report figures (paper §IV)."""
