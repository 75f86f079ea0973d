"""The network and its files: ``BlockDiffusionLM`` around a Hugging Face decoder, pretrained loading, tokenizers,
the run-directory layout and model load/save/export. Imports ``core`` and ``sampling``, never Lightning or ``datasets``.
"""
