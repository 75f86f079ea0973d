"""Corpora: documents -> tokens -> packed windows (``datasets``), and the distilled-set layout and reader
(``distilled``, ``distill_store``; ``training/distill.py`` writes the sets). No Lightning, no ``modeling``
(docs/design.md §11).
"""
