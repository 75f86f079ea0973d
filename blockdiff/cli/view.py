"""``blockdiff view``: a generation trace as a page that replays it, or as an animation."""

from __future__ import annotations

from pathlib import Path

from blockdiff.cli.render import console
from blockdiff.errors import UsageError


def run(args) -> None:
    """Turn a trace (`blockdiff sample ... --trace FILE`) into one self-contained HTML page that replays the
    generation step by step (-o, default TRACE.html), and/or an animation (--gif, --mp4)."""
    from blockdiff.viewer.trace import read_trace

    trace = read_trace(args.trace)
    if args.sample is not None and not 0 <= args.sample < len(trace.samples):
        raise UsageError(f"--sample {args.sample} is out of range: the trace holds {len(trace.samples)} samples")
    wants_page = args.output is not None or (args.gif is None and args.mp4 is None)
    if wants_page:
        from blockdiff.viewer.page import write_page

        page = write_page(trace, args.output or Path(args.trace).with_suffix(".html"))
        console.print(f"page: {page} — open it in a browser (everything is inside the file)", markup=False)
    for path, kind in ((args.gif, "gif"), (args.mp4, "mp4")):
        if path is not None:
            from blockdiff.cli.plot import require_plots

            require_plots(f"--{kind}")
            from blockdiff.viewer.animation import write_animation

            frames = write_animation(trace, path, kind, sample=args.sample or 0, fps=args.fps, width=args.width)
            console.print(f"{kind}: {path} ({frames} frames)", markup=False)


def add_arguments(p):
    p.add_argument("trace", help="a JSON-lines trace written by `blockdiff sample RUN --trace FILE`")
    p.add_argument("-o", "--output", help="the HTML page to write (default: the trace's name with .html)")
    p.add_argument("--gif", help="also (or only) write an animated GIF of one sample")
    p.add_argument("--mp4", help="also (or only) write an MP4 of one sample (needs ffmpeg on PATH)")
    p.add_argument("--sample", type=int, help="which sample of the trace the animation shows (default 0)")
    p.add_argument("--fps", type=float, default=6.0, help="animation frames per second (default 6)")
    p.add_argument("--width", type=int, default=720, help="animation width in pixels (default 720)")
