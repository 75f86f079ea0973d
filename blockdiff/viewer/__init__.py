"""What a person looks at: generation traces read back and replayed (``trace.py``), the self-contained trace page
(``page.py`` with its ``page.html`` and ``viewer.js``), animations of a trace (``animation.py``) and the figures of
runs and traces (``plots.py``, the one home of blockdiff's matplotlib code; the sweep report draws with it too).
"""
