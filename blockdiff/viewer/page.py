"""The trace page: one self-contained HTML file that replays a generation (``blockdiff view TRACE -o page.html``).

``page_data`` turns a ``Trace`` into the compact JSON the page replays; ``write_page`` inlines it, the template
(``page.html``) and the script (``viewer.js``), both package data next to this file. The page loads nothing from
the network: no CDN, no fonts, no libraries. What the page shows and how it replays: ``viewer.js``'s header.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from blockdiff.errors import UsageError
from blockdiff.files import write_text_atomic
from blockdiff.viewer.trace import Trace

__all__ = ["page_data", "render_page", "write_page"]


def page_data(trace: Trace) -> dict:
    """What the page needs, compactly: per sample its prompt, the kept tokens with their text segments, and every
    step as ``[block, step, forward, [position, token, confidence x 10000, ...], [re-opened positions]]``."""
    if not trace.complete:
        raise UsageError(
            f"{trace.path} was cut short (no end record: an interrupted `blockdiff sample`), so it lacks the text of "
            "its tokens; sample again with --trace to view it"
        )
    samples = []
    for s in trace.samples:
        steps = [
            [st.block, st.step, int(st.forward), [v for p, t, c in st.revealed for v in (p, t, round(c * 10000))],
             st.remasked]
            for st in s.steps
        ]
        samples.append({
            "prompt": s.prompt, "prompt_segments": s.prompt_segments, "new_tokens": s.new_tokens,
            "segments": s.segments, "text": s.text, "stop_reason": s.stop_reason, "nfe": s.nfe, "steps": steps,
        })
    title = f"blockdiff trace — {trace.path.name}"
    return {
        "title": title, "model": trace.model, "settings": trace.settings, "block_length": trace.block_length,
        "mask_token_id": trace.mask_token_id, "pieces": {str(k): v for k, v in trace.pieces.items()},
        "special_ids": sorted(trace.special_ids), "samples": samples,
    }


def _asset(name: str) -> str:
    return resources.files("blockdiff.viewer").joinpath(name).read_text(encoding="utf-8")


def render_page(trace: Trace) -> str:
    """The page as one HTML string."""
    data = page_data(trace)
    # inside <script type="application/json"> only "</script" or "<!--" could end the block early: escape every "<"
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")
    title = data["title"].replace("&", "&amp;").replace("<", "&lt;")
    page = _asset("page.html").replace("__TITLE__", title)
    page = page.replace("__VIEWER_JS__", _asset("viewer.js"))
    return page.replace("__TRACE_DATA__", payload)  # last: the data may contain the other placeholders' text


def write_page(trace: Trace, path: str | Path) -> Path:
    """Write the page to ``path`` (atomically); returns the path."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"-o {path} is a directory; give a file name such as {path / 'trace.html'}")
    write_text_atomic(path, render_page(trace))
    return path
