"""Pure math of block diffusion: attention masks, noise schedules, the NELBO, curricula, clip search.

No I/O, no Lightning, no model loading: functions of tensors (docs/design.md, "Layers").
"""
