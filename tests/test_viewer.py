"""The trace viewer (issue 13): a trace read back and replayed, the self-contained page, checked in a real browser.

1. ``read_trace`` / ``SampleTrace`` on real traces of ``blockdiff sample --trace`` (a tiny random model): the replay of
   the reveals gives every step's block exactly as the trace wrote it, the sampled tokens at the end, and the
   per-sample forward count of ``GenerationOutput.sample_nfe``; re-opened tokens (the remask sampler) included.
2. ``text_segments``: one piece per token, joining to the decoded text even across multi-byte characters.
3. ``blockdiff view``: one HTML file with the data inlined and nothing fetched; clear errors for what is not a trace.
4. ``--gif``: one frame per step, the last not blank (``--mp4`` with ffmpeg, refused clearly without).
5. The page in headless Chromium (Debian's ``chromium``, installed here when missing and apt can; skipped with the
   reason otherwise): after pressing play, after scrubbing to the end (the text on screen is the sampled text) and
   after scrubbing by block, a screenshot that is not blank, and a 4,096-token trace scrubbed to its end.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
from conftest import write_tiny_model_dir

from blockdiff.cli import main
from blockdiff.viewer.trace import read_trace


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model_dir(tmp_path_factory.mktemp("viewer_model"))


def sample_trace(model_dir, path, *flags, prompts=("The cat", "A")) -> tuple:
    """``blockdiff sample MODEL --trace path`` with ``flags``; returns (trace path, printed output)."""
    args = ["sample", str(model_dir), "--trace", str(path), "--temperature", "0.8"]
    for p in prompts:
        args += ["--prompt", p]
    assert main([*args, *flags]) == 0
    return path


@pytest.fixture(scope="module")
def trace_path(model_dir, tmp_path_factory):
    return sample_trace(model_dir, tmp_path_factory.mktemp("trace") / "t.jsonl", "--max-new-tokens", "22")


def check_replay(trace) -> None:
    for s in trace.samples:
        assert s.steps
        for k, step in enumerate(s.steps, 1):
            start = step.block * trace.block_length
            assert s.tokens_at(k)[start : start + trace.block_length] == step.tokens, (s.index, k)
        assert s.final_new_tokens() == s.new_tokens
        assert "".join(s.segments) == s.text
        assert s.forwards == s.nfe
        assert sum(s.revealed_per_forward()) == sum(len(st.revealed) for st in s.steps)
        final = s.cells(len(s.steps), trace.pieces, trace.special_ids)  # what the page and the GIF draw at the end
        assert "".join(c.text for c in final if c.kind == "gen") == s.text
        assert not [c for c in final if c.kind == "mask"]


def test_replaying_a_trace_gives_every_step_and_the_sampled_tokens(trace_path):
    trace = read_trace(trace_path)
    assert trace.complete and len(trace.samples) == 2 and trace.block_length == 4
    assert ["".join(s.prompt_segments) for s in trace.samples] == ["The cat", "A"]
    assert all(s.prompt[0] == 256 and s.prompt_segments[0] == "" for s in trace.samples)  # BOS, not in the text
    check_replay(trace)
    assert trace.samples[0].tokens_at(0) == trace.samples[0].prompt
    assert trace.settings["max_new_tokens"] == 22 and trace.settings["sampler"] == "threshold"


def test_replay_marks_re_opened_tokens(model_dir, tmp_path):
    path = sample_trace(model_dir, tmp_path / "r.jsonl", "--sampler", "remask", "--remask-threshold", "1.0",
                        "--max-remask", "2", "--max-new-tokens", "16", prompts=("ab",))
    trace = read_trace(path)
    check_replay(trace)
    reopened = [p for st in trace.samples[0].steps for p in st.remasked]
    assert reopened, "the remask sampler at threshold 1.0 re-opened nothing"


def test_text_segments_join_to_the_text_across_multibyte_characters():
    from blockdiff.modeling.tokenizer import byte_tokenizer
    from blockdiff.viewer import watch
    from blockdiff.viewer.watch import text_segments

    tok = byte_tokenizer()
    ids = tok("héllo ☃!", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    segments = text_segments(tok, ids)
    assert len(segments) == len(ids) and "".join(segments) == "héllo ☃!"
    assert segments[1:3] == ["", "é"]  # the first byte of é adds nothing yet, the second the character
    assert segments[-1] == ""  # EOS is a special token: not in the text
    assert watch._segments_by_prefix(tok, ids, "héllo ☃!") == segments  # the incremental split == prefix by prefix
    rng = random.Random(0)
    noise = [rng.randrange(256) for _ in range(2000)]  # invalid UTF-8 everywhere: still joins exactly
    assert "".join(text_segments(tok, noise)) == tok.decode(noise, skip_special_tokens=True)


def test_view_writes_one_self_contained_page(trace_path, tmp_path, capsys):
    page = tmp_path / "page.html"
    assert main(["view", str(trace_path), "-o", str(page)]) == 0
    assert str(page) in capsys.readouterr().out
    html = page.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html), "the page loads something from the network"
    assert "<link" not in html and "@import" not in html and "__TRACE_DATA__" not in html
    data = json.loads(re.search(r'<script id="trace-data" type="application/json">(.*?)</script>', html, re.S).group(1))
    assert [s["text"] for s in data["samples"]] == [s.text for s in read_trace(trace_path).samples]
    assert main(["view", str(trace_path)]) == 0  # default: next to the trace
    assert trace_path.with_suffix(".html").is_file()


@pytest.mark.parametrize("content,message", [
    ('{"block": 0}\n', "not a trace record"),
    ("not json\n", "is not JSON"),
    ('{"block": 0, "step": 1, "samples": [0], "block_start": [0], "tokens": [[1]], "revealed": [[0]]}\n',
     "no header line"),
])
def test_view_refuses_what_is_not_a_trace(tmp_path, capsys, content, message):
    path = tmp_path / "x.jsonl"
    path.write_text(content)
    assert main(["view", str(path)]) == 2
    assert message in capsys.readouterr().err
    assert not path.with_suffix(".html").exists()


def test_view_refuses_a_missing_file_and_an_interrupted_trace(trace_path, tmp_path, capsys):
    assert main(["view", str(tmp_path / "none.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    cut = tmp_path / "cut.jsonl"
    cut.write_text("".join(trace_path.read_text().splitlines(keepends=True)[:-1]))  # no end record: Ctrl-C
    assert main(["view", str(cut)]) == 2
    assert "cut short" in capsys.readouterr().err


def long_trace(model_dir, path, n: int):
    """A trace of ``n`` new tokens exactly (EOS off: the random model would stop early), written as ``sample`` does."""
    import torch

    from blockdiff.modeling.io import load_model_dir
    from blockdiff.sampling import encode_prompts
    from blockdiff.viewer.watch import TraceWriter, trace_end, trace_header

    loaded = load_model_dir(model_dir)
    ids = encode_prompts(loaded.tokenizer, ["x"])
    settings = {"sampler": "fixed", "tokens_per_step": 4, "max_new_tokens": n}
    writer = TraceWriter(path, trace_header(ids, loaded.model.mask_token_id, 4, str(model_dir), settings))
    out = loaded.model.generate(ids, eos_token_id=None, generator=torch.Generator().manual_seed(0), observer=writer,
                                temperature=1.0, **settings)
    texts = [loaded.tokenizer.decode(out.new_tokens(0), skip_special_tokens=True)]
    writer.close(end=trace_end(out, texts, loaded.tokenizer, writer.seen | set(ids[0])))
    return path


def test_gif_has_a_frame_per_step_and_a_final_frame_that_is_not_blank(trace_path, tmp_path, capsys):
    from PIL import Image, ImageChops, ImageStat

    gif, own = tmp_path / "t.gif", tmp_path / "own.jsonl"
    shutil.copy(trace_path, own)
    assert main(["view", str(own), "--gif", str(gif), "--sample", "1"]) == 0
    assert "gif:" in capsys.readouterr().out and not own.with_suffix(".html").exists()  # --gif alone: no page
    sample = read_trace(trace_path).samples[1]
    image = Image.open(gif)
    assert image.n_frames == len(sample.steps) + 1  # the prompt, then one frame per step
    image.seek(0)
    first = image.convert("RGB")
    image.seek(image.n_frames - 1)
    last = image.convert("RGB")
    assert image.info["duration"] > 1000  # the final frame is held
    assert max(ImageStat.Stat(last).stddev) > 10, "the final frame is blank"
    diff = ImageChops.difference(first, last).convert("L")
    assert sum(1 for v in diff.getdata() if v > 40) > 200, "the final frame shows nothing the prompt frame did not"


def test_mp4_needs_ffmpeg(trace_path, tmp_path, capsys, monkeypatch):
    import blockdiff.viewer.animation as animation

    monkeypatch.setattr(animation.shutil, "which", lambda name: None)
    assert main(["view", str(trace_path), "--mp4", str(tmp_path / "t.mp4")]) == 2
    assert "needs ffmpeg" in capsys.readouterr().err and not (tmp_path / "t.mp4").exists()


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed (the refusal is tested above)")
def test_mp4_is_written_with_ffmpeg(trace_path, tmp_path):
    assert main(["view", str(trace_path), "--mp4", str(tmp_path / "t.mp4")]) == 0
    assert (tmp_path / "t.mp4").stat().st_size > 1000


# -- the page in a real browser ---------------------------------------------------------------------------------
def _install_chromium() -> str:
    """Try ``apt-get install chromium`` (root only); returns why it could not, or ``""``."""
    if shutil.which("apt-get") is None:
        return "apt-get is not available (install Chromium by hand)"
    if os.geteuid() != 0:
        return "not root, so apt-get cannot install it (run `sudo apt-get install -y chromium`)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "-o", "DPkg::Lock::Timeout=600", "chromium"]
    for commands in ([install], [["apt-get", "update", "-q"], install]):
        try:
            if all(subprocess.run(c, env=env, capture_output=True, timeout=1200).returncode == 0 for c in commands):
                return ""
        except (OSError, subprocess.TimeoutExpired) as err:
            reason = str(err)
        else:
            reason = "apt-get install -y chromium failed"
    return reason


@pytest.fixture(scope="session")
def chromium():
    """The Chromium binary, installed first when missing (the test setup CI's fresh machine gets)."""
    names = ("chromium", "chromium-browser", "google-chrome")
    found = next((shutil.which(n) for n in names if shutil.which(n)), None)
    if found is None:
        reason = _install_chromium()
        found = shutil.which("chromium")
        if found is None:
            pytest.skip(f"no headless browser for the page test: {reason or 'chromium not on PATH after install'}")
    return found


def browse(chromium, page, tmp_path, fragment: str, budget_ms: int = 3000, screenshot=None) -> str:
    """Load ``page#fragment`` in headless Chromium, let ``budget_ms`` of virtual time pass; the DOM as HTML."""
    args = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}", f"--virtual-time-budget={budget_ms}", "--window-size=1200,900"]
    args += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    proc = subprocess.run([*args, f"{page.as_uri()}#{fragment}"], capture_output=True, timeout=300,
                          stdin=subprocess.DEVNULL)  # bytes: text mode would turn a generated "\r" into "\n"
    assert proc.returncode == 0, proc.stderr[-2000:].decode(errors="replace")
    return proc.stdout.decode("utf-8")


class Spans(HTMLParser):
    """The token spans of ``#text`` (class list, title, text) and the text of every element with an id."""

    def __init__(self):
        super().__init__()
        self.spans, self.by_id, self.stack = [], {}, []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.stack.append((tag, a.get("id")))
        if tag == "span" and "tok" in (a.get("class") or "").split():
            self.spans.append({"class": a["class"].split(), "title": a.get("title", ""), "text": ""})
        for _, ident in self.stack:
            if ident:
                self.by_id.setdefault(ident, "")

    def handle_endtag(self, tag):
        while self.stack and self.stack.pop()[0] != tag:
            pass

    def handle_data(self, data):
        for _, ident in self.stack:
            if ident:
                self.by_id[ident] = self.by_id.get(ident, "") + data
        if self.stack and self.stack[-1][0] == "span" and self.spans and any(i == "text" for _, i in self.stack):
            self.spans[-1]["text"] += data


def parse(dom: str) -> Spans:
    p = Spans()
    p.feed(dom)
    return p


def shown_tokens(dom: Spans) -> dict[int, int]:
    """``{position: token}`` of the generated tokens on screen (from each span's title)."""
    out = {}
    for s in dom.spans:
        m = re.match(r"position (\d+), token (\d+)", s["title"])
        if m:
            out[int(m.group(1))] = int(m.group(2))
    return out


@pytest.fixture(scope="module")
def page(trace_path, tmp_path_factory):
    path = tmp_path_factory.mktemp("page") / "page.html"
    assert main(["view", str(trace_path), "-o", str(path)]) == 0
    return path


def test_page_after_play_shows_the_replayed_state(chromium, page, trace_path, tmp_path):
    sample = read_trace(trace_path).samples[0]
    dom = parse(browse(chromium, page, tmp_path, "play&speed=40", budget_ms=300))
    k, total = map(int, dom.by_id["step-counter"].split(" / "))
    assert total == len(sample.steps) and 0 < k <= total, "pressing play advanced no step"
    state = sample.tokens_at(k)
    expected = {p: t for p, t in enumerate(state) if p >= len(sample.prompt) and t != sample.mask_token_id}
    assert shown_tokens(dom) == expected  # the page's replay is the Python replay
    assert int(dom.by_id["nfe"]) == sum(st.forward for st in sample.steps[:k])
    masks = [s for s in dom.spans if "mask" in s["class"]]
    current = state[sample.steps[k - 1].block * 4 : sample.steps[k - 1].block * 4 + 4]
    assert len(masks) == current.count(sample.mask_token_id)


def test_page_scrubbed_to_the_end_shows_the_sampled_text(chromium, page, trace_path, tmp_path):
    trace = read_trace(trace_path)
    for i, sample in enumerate(trace.samples):
        dom = parse(browse(chromium, page, tmp_path, f"sample={i}&step=end"))
        generated = "".join(s["text"] for s in dom.spans if "gen" in s["class"] and "cut" not in s["class"])
        assert generated == sample.text, f"sample {i}: the page's final text is not the sampled text"
        prompt = "".join(s["text"] for s in dom.spans if "prompt" in s["class"])
        assert prompt == ("The cat", "A")[i]
        assert not [s for s in dom.spans if "mask" in s["class"]]
        assert int(dom.by_id["nfe"]) == sample.nfe and int(dom.by_id["tokens"]) == len(sample.new_tokens)
        assert dom.by_id["tpf"] == f"{len(sample.new_tokens) / sample.nfe:.2f}"


def test_page_scrubbed_by_block_stops_at_that_block(chromium, page, trace_path, tmp_path):
    sample = read_trace(trace_path).samples[1]
    blocks = sorted(sample.block_reveals())
    dom = parse(browse(chromium, page, tmp_path, "sample=1&block=1"))
    assert dom.by_id["block-counter"] == f"2 / {len(blocks)}"
    end = (blocks[1] + 1) * sample.block_length
    assert max(shown_tokens(dom)) == end - 1  # the second block complete, nothing after it
    assert shown_tokens(dom) == {p: t for p, t in enumerate(sample.tokens_at(len(sample.steps))[:end])
                                 if p >= len(sample.prompt)}


def test_page_screenshot_is_not_blank(chromium, page, tmp_path):
    from PIL import Image, ImageStat

    shot = tmp_path / "page.png"
    browse(chromium, page, tmp_path, "step=6", screenshot=shot)
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 900)
    colours = image.getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 50, "the screenshot has almost no colours: a blank page"
    dark = sum(n for n, c in (colours or []) if sum(c) < 200)  # text is dark on a light page
    assert colours is None or dark > 500
    assert max(ImageStat.Stat(image).stddev) > 10


def test_page_of_a_4096_token_trace_scrubs_to_its_end(chromium, model_dir, tmp_path):
    path = long_trace(model_dir, tmp_path / "long.jsonl", 4096)
    trace = read_trace(path)
    assert len(trace.samples[0].new_tokens) == 4096
    page = tmp_path / "long.html"
    assert main(["view", str(path), "-o", str(page)]) == 0
    dom = parse(browse(chromium, page, tmp_path, "step=end", budget_ms=10000))
    gen = [s for s in dom.spans if "gen" in s["class"]]
    assert len(gen) == 4096
    assert "".join(s["text"] for s in gen) == trace.samples[0].text
    assert dom.by_id["step-counter"] == f"{len(trace.samples[0].steps)} / {len(trace.samples[0].steps)}"


# -- issue 20: never overwrite the input or an existing file; damaged traces refused in one line ---------------------


def test_view_never_overwrites_its_input_nor_an_existing_file(trace_path, tmp_path, capsys):
    own = tmp_path / "t.html"  # a trace whose name ends in .html: its default page would be itself
    shutil.copy(trace_path, own)
    before = own.read_bytes()
    assert main(["view", str(own)]) == 2
    assert "input" in capsys.readouterr().err and own.read_bytes() == before
    assert main(["view", str(own), "-o", str(own), "--overwrite"]) == 2  # not even with --overwrite
    assert "input" in capsys.readouterr().err and own.read_bytes() == before
    essay = tmp_path / "essay.txt"
    essay.write_text("mine")
    assert main(["view", str(trace_path), "-o", str(essay)]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert essay.read_text() == "mine"
    gif = tmp_path / "a.gif"
    gif.write_bytes(b"not mine to replace")
    page = tmp_path / "p.html"
    assert main(["view", str(trace_path), "-o", str(page), "--gif", str(gif)]) == 2  # refused before the page
    assert not page.exists() and gif.read_bytes() == b"not mine to replace"
    assert main(["view", str(trace_path), "-o", str(essay), "--overwrite"]) == 0
    assert "<html" in essay.read_text().lower()


def test_view_checks_the_animation_name_and_folder_before_writing_anything(trace_path, tmp_path, capsys):
    page = tmp_path / "p.html"
    assert main(["view", str(trace_path), "-o", str(page), "--gif", str(tmp_path / "x.txt")]) == 2
    assert ".gif" in capsys.readouterr().err and not page.exists() and not (tmp_path / "x.txt").exists()
    missing = tmp_path / "nonexistent" / "x.gif"
    assert main(["view", str(trace_path), "--gif", str(missing)]) == 2
    assert "does not exist" in capsys.readouterr().err and not missing.parent.exists()


def test_gif_reports_progress_frame_by_frame(trace_path, tmp_path):
    from blockdiff.viewer.animation import write_animation

    calls = []
    trace = read_trace(trace_path)
    frames = write_animation(trace, tmp_path / "t.gif", progress=lambda *a: calls.append(a))
    assert calls[0] == ("drawing frames", 0, frames) and calls[-1][0] == "writing the gif"
    assert not [p for p in tmp_path.iterdir() if p.name != "t.gif"]  # no temporary file left


def _step(**change) -> str:
    record = {"block": 0, "step": 1, "samples": [0], "block_start": [4], "tokens": [[1, 2, 3, 4]], "revealed": [[4]],
              "remasked": [[]], "confidence": [[0.5]], "forward": True}
    return json.dumps({**record, **change}) + "\n"


_HEADER = json.dumps({"kind": "header", "prompts": [[256, 1, 2, 3]], "mask_token_id": 258, "block_length": 4}) + "\n"


@pytest.mark.parametrize("content,message", [
    (b"", "is empty"),
    (b"\x89PNG\r\n\x1a\n\x00\xff\xfe binary", "not UTF-8"),
    ((_HEADER + _step(samples=[99])).encode(), "samples [99]"),
    ((_HEADER + _step(tokens=[[1e30, 2, 3, 4]])).encode(), "integers >= 0"),
    ((_HEADER + _step(tokens=[[-5, 2, 3, 4]])).encode(), "integers >= 0"),
    ((_HEADER + _step(tokens=[["x", 2, 3, 4]])).encode(), "integers >= 0"),
    ((_HEADER + _step(tokens=[[None, 2, 3, 4]])).encode(), "integers >= 0"),
    ((_HEADER + _step(revealed=[[40]])).encode(), "in the block"),
])
def test_view_and_plot_refuse_a_damaged_trace_in_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "x.jsonl"
    path.write_bytes(content)
    assert main(["view", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "older blockdiff" not in err
    assert not path.with_suffix(".html").exists()
    assert main(["plot", str(path), "-o", str(tmp_path / "plots")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_every_output_follows_the_umask(trace_path, model_dir, tmp_path):
    """issue 20: pages, ``eval --json`` files and run configs (``files.write_text_atomic``, through ``mkstemp``) were
    0600 whatever the umask, while everything else followed it."""
    from blockdiff.files import write_text_atomic

    old = os.umask(0o027)
    try:
        assert main(["view", str(trace_path), "-o", str(tmp_path / "p.html"), "--gif", str(tmp_path / "t.gif")]) == 0
        assert main(["eval", str(model_dir), "--max-batches", "1", "--json", str(tmp_path / "e.json")]) == 0
        write_text_atomic(tmp_path / "config.yaml", "a: 1\n")  # how train writes the run's config.yaml
    finally:
        os.umask(old)
    for name in ("p.html", "t.gif", "e.json", "config.yaml"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name
