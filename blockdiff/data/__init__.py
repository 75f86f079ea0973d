"""Corpora: documents -> tokens -> packed windows (``datasets``); no Lightning.
"""
