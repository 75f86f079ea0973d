"""The samplers: one step rule per file, their interface (``base.py``) and their registry (``registry.py``)
(docs/design.md §9). Importing this package registers the built-ins, in the order ``sampler_names()`` lists them;
each sampler module imports the registry, never the other way round. The public names are ``blockdiff.sampling``'s."""

# isort: off
# The built-in samplers, each registered by its own module, in this order (the order of sampler_names()).
from blockdiff.sampling.samplers import threshold, first_hitting, fixed, ddpm, remasking, entropy_bound  # noqa: F401
from blockdiff.sampling.samplers import editing, renoise  # noqa: F401
# The rules that apply with any sampler (registry.register_rule).
from blockdiff.sampling.samplers import adaptive_stop  # noqa: F401
# isort: on
