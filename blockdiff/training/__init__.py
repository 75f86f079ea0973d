"""Training recipe: builders from a run config (``builders``), the Lightning module, data module and ``Trainer``
(``trainer``), callbacks, safe checkpoints, resume (``resume``), ``train()``, fine-tuning defaults and checkpoint
export (``export``).
"""
