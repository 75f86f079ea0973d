"""Ablation sweeps: the spec, the runner (one subprocess per run), the report and plots.
"""
