"""Training recipe: the Lightning module, data module, callbacks, checkpoints, resume, and ``train()``.
"""
