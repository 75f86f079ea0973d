"""``blockdiff view``: a generation trace as a page that replays it, or as an animation."""

from __future__ import annotations

from pathlib import Path

from blockdiff.cli.render import console
from blockdiff.errors import UsageError


def run(args) -> None:
    """Turn a trace (`blockdiff sample ... --trace FILE`) into one self-contained HTML page that replays the
    generation step by step (-o, default TRACE.html), and/or an animation (--gif, --mp4). The trace itself is never
    written; an existing output is replaced only with --overwrite."""
    from blockdiff.files import check_output_file
    from blockdiff.viewer.trace import read_trace

    wants_page = args.output is not None or (args.gif is None and args.mp4 is None)
    page_path = Path(args.output) if args.output is not None else Path(args.trace).with_suffix(".html")
    # every output checked before anything is read or written: a refused --gif leaves no page behind
    outputs = [(page_path, "-o" if args.output is not None else "the page (-o)", ())] if wants_page else []
    outputs += [(Path(p), f"--{kind}", (f".{kind}",)) for p, kind in ((args.gif, "gif"), (args.mp4, "mp4")) if p]
    names = [p.resolve() for p, _, _ in outputs]
    if len(set(names)) < len(names):
        raise UsageError("-o, --gif and --mp4 name the same file; give each its own name")
    for path, flag, suffixes in outputs:
        check_output_file(path, flag, args.overwrite, inputs=[args.trace], suffixes=suffixes)
    if args.gif or args.mp4:
        from blockdiff.cli.plot import require_plots

        require_plots("--gif" if args.gif else "--mp4")
    if args.mp4:
        import shutil

        if shutil.which("ffmpeg") is None:  # before the page is written
            raise UsageError("--mp4 needs ffmpeg on PATH (e.g. `apt-get install ffmpeg`); --gif works without it")
    trace = read_trace(args.trace)
    if args.sample is not None and not 0 <= args.sample < len(trace.samples):
        raise UsageError(f"--sample {args.sample} is out of range: the trace holds {len(trace.samples)} samples")
    if wants_page:
        from blockdiff.viewer.page import write_page

        page = write_page(trace, page_path)
        console.print(f"page: {page} — open it in a browser (everything is inside the file)", markup=False)
    for path, kind in ((args.gif, "gif"), (args.mp4, "mp4")):
        if path is not None:
            from blockdiff.cli.render import stage_progress
            from blockdiff.viewer.animation import write_animation

            with stage_progress() as progress:
                frames = write_animation(trace, path, kind, sample=args.sample or 0, fps=args.fps, width=args.width,
                                         progress=progress)
            console.print(f"{kind}: {path} ({frames} frames)", markup=False)


def add_arguments(p):
    p.add_argument("trace", help="a JSON-lines trace written by `blockdiff sample RUN --trace FILE`")
    p.add_argument("-o", "--output", help="the HTML page to write (default: the trace's name with .html)")
    p.add_argument("--gif", help="also (or only) write an animated GIF of one sample")
    p.add_argument("--mp4", help="also (or only) write an MP4 of one sample (needs ffmpeg on PATH)")
    p.add_argument("--sample", type=int, help="which sample of the trace the animation shows (default 0)")
    p.add_argument("--fps", type=float, default=6.0, help="animation frames per second (default 6)")
    p.add_argument("--width", type=int, default=720, help="animation width in pixels (default 720)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace output files that already exist (the trace itself is never replaced)")
