"""Training recipe: builders from a run config (``builders``), the Lightning module, data module and ``Trainer``
(``trainer``), callbacks, safe checkpoints, resume (``resume``), ``train()``, fine-tuning defaults, self-distillation
sets (``distill``: a teacher's continuations, written as a ``data/`` distilled set) and checkpoint export (``export``).
"""
