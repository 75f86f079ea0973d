"""Evaluations, each defined once: NELBO on held-out text, AR scoring (judge), generate-and-judge.
No Lightning.
"""
