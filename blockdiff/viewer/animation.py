"""A trace as an animation for READMEs and slides: one frame per denoising step (``blockdiff view T --gif out.gif``).

Frame 0 is the prompt alone, frame ``k`` the sample after step ``k`` (``SampleTrace.cells``: the same cells the page
draws), the last frame held longer. Drawn with Pillow in the monospace DejaVu font matplotlib ships; written as a
GIF by Pillow, or as an MP4 by piping the frames to ``ffmpeg`` when it is on PATH. Both need the ``plots`` extra.

Colours follow the page: prompt grey, masks purple ``░``, revealed tokens on a red→green background by confidence,
this step's reveals underlined, re-opened tokens with a red underline, tokens after the stop struck through.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from blockdiff.errors import MissingFileError, UsageError
from blockdiff.files import atomic_path
from blockdiff.viewer.trace import Cell, SampleTrace, Trace

__all__ = ["frame_count", "render_frames", "write_animation"]

BACKGROUND, INK, MUTED, MASK = (250, 250, 250), (29, 31, 33), (107, 114, 128), (176, 106, 179)
PROMPT_BG = (229, 231, 235)


def frame_count(sample: SampleTrace) -> int:
    """Frames of a sample's animation: the prompt, then one per step."""
    return len(sample.steps) + 1


def _font(size: int):
    from matplotlib import font_manager
    from PIL import ImageFont

    return ImageFont.truetype(font_manager.findfont("DejaVu Sans Mono"), size)


def _confidence_colour(c: float) -> tuple[int, int, int]:
    import colorsys

    r, g, b = colorsys.hls_to_rgb(c / 3, 0.84, 0.7)  # hue 0 (red) .. 1/3 (green), as the page's hsl()
    return int(r * 255), int(g * 255), int(b * 255)


def _layout(cells: list[Cell], columns: int) -> list[list[tuple[str, Cell]]]:
    """Cells broken into lines of at most ``columns`` characters (at newlines too); each line ``[(chars, cell)]``."""
    lines: list[list[tuple[str, Cell]]] = [[]]
    used = 0
    for cell in cells:
        text = cell.text.replace("\t", "    ").replace("\r", "")
        parts = text.split("\n")
        for n, part in enumerate(parts):
            part = "".join(ch if ch.isprintable() else "·" for ch in part)
            while part:
                room = columns - used
                if room <= 0:
                    lines.append([])
                    used, room = 0, columns
                lines[-1].append((part[:room], cell))
                used += len(part[:room])
                part = part[room:]
            if n < len(parts) - 1:
                lines.append([])
                used = 0
    return lines


def render_frames(trace: Trace, sample: int = 0, width: int = 720, rows: int = 12, font_size: int = 15,
                  progress=None):
    """The animation's frames as RGB Pillow images (``frame_count`` of them). ``rows`` lines of text are shown: the
    last ones when the text grows longer, so the block being written stays in view. ``progress(stage, done, total)``
    is told of every frame drawn (``cli.render.stage_progress``)."""
    from PIL import Image, ImageDraw

    s = trace.samples[sample]
    font, small = _font(font_size), _font(max(9, font_size - 3))
    char_w = font.getlength("M")
    line_h = int(font_size * 1.55)
    pad, header = 12, int(font_size * 1.9)
    columns = max(10, int((width - 2 * pad) // char_w))
    rows = min(rows, max(3, len(_layout(s.cells(len(s.steps), trace.pieces, trace.special_ids), columns))))
    height = header + rows * line_h + 2 * pad
    frames, forwards, made = [], 0, 0
    total = frame_count(s)
    for k in range(total):
        if progress is not None and k % 25 == 0:
            progress("drawing frames", k, total)
        if k:
            forwards += s.steps[k - 1].forward
            made += len(s.steps[k - 1].revealed) - len(s.steps[k - 1].remasked)
        image = Image.new("RGB", (width, height), BACKGROUND)
        draw = ImageDraw.Draw(image)
        block = f"block {s.steps[k - 1].block - s.steps[0].block + 1}/{s.num_blocks}" if k else "prompt"
        kept = min(made, len(s.new_tokens)) if s.new_tokens is not None else made
        rate = f"{kept / forwards:.2f}" if forwards else "–"
        status = f"{block} · step {k}/{len(s.steps)} · NFE {forwards} · {kept} tokens · {rate} tokens/forward"
        draw.text((pad, pad), status, font=small, fill=MUTED)
        lines = _layout(s.cells(k, trace.pieces, trace.special_ids), columns)[-rows:]
        for row, line in enumerate(lines):
            x, y = pad, header + pad + row * line_h
            for chars, cell in line:
                w = char_w * len(chars)
                _draw_cell(draw, x, y, w, line_h, chars, cell, font)
                x += w
        frames.append(image)
    return frames


def _draw_cell(draw, x, y, w, h, chars, cell: Cell, font) -> None:
    if cell.kind == "prompt":
        draw.rectangle((x, y, x + w, y + h - 3), fill=PROMPT_BG)
        draw.text((x, y + 2), chars, font=font, fill=MUTED)
        return
    if cell.kind == "mask":
        draw.text((x, y + 2), chars, font=font, fill=MASK)
        return
    draw.rectangle((x, y, x + w, y + h - 3), fill=_confidence_colour(cell.confidence))
    draw.text((x, y + 2), chars, font=font, fill=MUTED if cell.kind == "cut" else INK)
    if cell.fresh:
        draw.rectangle((x, y + h - 6, x + w, y + h - 4), fill=INK)
    if cell.reopened:
        draw.rectangle((x, y + h - 4, x + w, y + h - 3), fill=(220, 38, 38))
    if cell.kind == "cut":
        draw.line((x, y + h // 2, x + w, y + h // 2), fill=MUTED)


def write_animation(trace: Trace, path: str | Path, kind: str = "gif", sample: int = 0, fps: float = 6.0,
                    width: int = 720, hold_seconds: float = 2.5, progress=None) -> int:
    """Write sample ``sample`` of ``trace`` as a GIF or an MP4 (through a temporary file: never half-written); returns
    the number of frames. ``path`` must end in ``.gif`` / ``.mp4`` and its folder must exist (it is not created).
    ``progress(stage, done, total)``: told of each frame drawn and of the encoding."""
    if kind not in ("gif", "mp4"):
        raise UsageError(f"an animation is a gif or an mp4, not {kind!r}")
    if not trace.complete:
        raise UsageError(f"{trace.path} was cut short (no end record); sample again with --trace to animate it")
    if fps <= 0 or width < 200:
        raise UsageError(f"--fps must be > 0 and --width >= 200 (got {fps}, {width})")
    ffmpeg = shutil.which("ffmpeg") if kind == "mp4" else None
    if kind == "mp4" and ffmpeg is None:
        raise UsageError("--mp4 needs ffmpeg on PATH (e.g. `apt-get install ffmpeg`); --gif works without it")
    path = Path(path)
    if path.suffix.lower() != f".{kind}":
        raise UsageError(f"--{kind} {path}: the file name must end in .{kind}")
    if path.is_dir():
        raise UsageError(f"{path} is a directory; give a file name such as {path / ('trace.' + kind)}")
    if not path.parent.is_dir():
        raise MissingFileError(f"--{kind} {path}: the folder {path.parent} does not exist; create it first")
    frames = render_frames(trace, sample, width, progress=progress)
    if progress is not None:
        progress(f"writing the {kind}", 0, 0)
    with atomic_path(path) as tmp:
        if kind == "gif":
            step_ms = int(1000 / fps)
            durations = [step_ms] * (len(frames) - 1) + [int(hold_seconds * 1000)]
            frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0,
                           optimize=True)
        else:
            _write_mp4(ffmpeg, frames, tmp, fps, hold_seconds)
    return len(frames)


def _write_mp4(ffmpeg: str, frames, path: Path, fps: float, hold_seconds: float) -> None:
    w, h = frames[0].size
    held = frames + [frames[-1]] * max(0, int(hold_seconds * fps))
    cmd = [ffmpeg, "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", str(fps),
           "-i", "-", "-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2", "-pix_fmt", "yuv420p", "-f", "mp4", str(path)]
    proc = subprocess.run(cmd, input=b"".join(f.tobytes() for f in held), capture_output=True)
    if proc.returncode != 0:
        raise UsageError(f"ffmpeg could not write {path}: {proc.stderr.decode(errors='replace')[-500:]}")
