// blockdiff trace viewer: replays the steps inlined by blockdiff/viewer/page.py (no network, no libraries).
// The state after step k is the prompt, the earlier blocks and the current block after k's reveals, exactly as
// SampleTrace.tokens_at(k) computes it in blockdiff/viewer/trace.py. Only the blocks a seek changed are redrawn
// (and the browser skips off-screen blocks: content-visibility), so a 4,096-token trace stays responsive.
// URL hash (for links and headless tests): #sample=I&step=K|end&block=J&play&speed=MS&mode=block
"use strict";
(function () {
  const DATA = JSON.parse(document.getElementById("trace-data").textContent);
  const L = DATA.block_length, MASK = DATA.mask_token_id;
  const SPECIAL = new Set(DATA.special_ids);
  const $ = (id) => document.getElementById(id);
  let S = null;            // the selected sample, with derived arrays
  let k = 0;               // steps applied
  let tokens, conf, reopened, fresh;  // per-position state (Int32Array, Float32Array, Uint8Array, Uint8Array)
  let rendered = [];       // per block: its signature as drawn (null: not in the DOM)
  let blockEls = [];
  let timer = null;
  let barWidth = 2;         // of the chart's block bars, as last drawn

  function piece(t) { return DATA.pieces[t] !== undefined ? DATA.pieces[t] : "<" + t + ">"; }

  function prepare(i) {
    const s = DATA.samples[i];
    const steps = s.steps.map(([block, step, forward, flat, remasked]) => {
      const revealed = [];
      for (let j = 0; j < flat.length; j += 3) revealed.push([flat[j], flat[j + 1], flat[j + 2] / 10000]);
      return { block, step, forward: !!forward, revealed, remasked };
    });
    const n = Math.max(s.prompt.length, ...steps.map((st) => (st.block + 1) * L));
    const nfe = [0], made = [0];  // prefix sums over steps
    for (const st of steps) {
      nfe.push(nfe[nfe.length - 1] + (st.forward ? 1 : 0));
      made.push(made[made.length - 1] + st.revealed.length - st.remasked.length);
    }
    const blocks = [...new Set(steps.map((st) => st.block))];
    const blockEnd = {};  // block -> steps applied when it is final
    steps.forEach((st, j) => { blockEnd[st.block] = j + 1; });
    const perBlock = {};
    for (const st of steps) (perBlock[st.block] = perBlock[st.block] || []).push(st.revealed.length);
    return { ...s, steps, n, nfe, made, blocks, blockEnd, perBlock, P: s.prompt.length,
             kept: s.new_tokens ? s.new_tokens.length : Infinity,
             firstBlock: blocks.length ? blocks[0] : 0, numBlocks: Math.ceil(n / L) };
  }

  function reset() {
    tokens = new Int32Array(S.n).fill(MASK);
    conf = new Float32Array(S.n);
    reopened = new Uint8Array(S.n);
    fresh = new Uint8Array(S.n);
    S.prompt.forEach((t, p) => { tokens[p] = t; conf[p] = 1; });
    k = 0;
  }

  function apply(st) {
    for (const [p, t, c] of st.revealed) { tokens[p] = t; conf[p] = c; }
    for (const p of st.remasked) { tokens[p] = MASK; reopened[p] = 1; }
  }

  function seek(target) {
    target = Math.max(0, Math.min(S.steps.length, target));
    if (target < k) reset();
    fresh.fill(0);
    while (k < target) apply(S.steps[k++]);
    if (k > 0) for (const [p] of S.steps[k - 1].revealed) fresh[p] = 1;
    draw();
  }

  function currentBlock() { return k > 0 ? S.steps[k - 1].block : null; }

  function lastShownBlock() {  // blocks up to the one being denoised are on screen; the prompt's blocks always
    const promptBlocks = Math.ceil(S.P / L) - 1;
    const b = currentBlock();
    return Math.max(promptBlocks, b === null ? -1 : b);
  }

  function signature(b) {
    let sig = "";
    for (let p = b * L; p < Math.min(S.n, (b + 1) * L); p++) sig += tokens[p] + (fresh[p] ? "f" : "") + (reopened[p] ? "r" : "") + ",";
    return sig + (b === currentBlock() ? (k === S.steps.length ? "e" : "c") : "");
  }

  function span(text, cls) {
    const el = document.createElement("span");
    el.className = cls;
    el.textContent = text;
    return el;
  }

  function tokenSpan(p) {
    const t = tokens[p];
    if (p < S.P) return span(S.prompt_segments ? S.prompt_segments[p] : piece(t), "tok prompt");
    const j = p - S.P;
    if (t === MASK) return span("░", "tok mask");
    const final = S.new_tokens && j < S.kept && S.new_tokens[j] === t;
    let cls = "tok gen";
    if (j >= S.kept) cls += " cut";
    if (fresh[p]) cls += " fresh";
    if (reopened[p]) cls += " reopened";
    const isSpecial = SPECIAL.has(t);
    if (isSpecial) cls += " special";
    const el = span(final ? S.segments[j] : (isSpecial ? "" : piece(t)), cls);
    if (isSpecial) el.dataset.name = piece(t);
    el.style.background = "hsl(" + Math.round(120 * conf[p]) + ",70%,84%)";
    el.title = "position " + p + ", token " + t + ", confidence " + conf[p].toFixed(3);
    return el;
  }

  function drawBlock(b) {
    const el = blockEls[b] || (blockEls[b] = document.createElement("span"));
    el.className = "blk" + (b === currentBlock() ? " current" : "");
    el.dataset.block = b;
    el.replaceChildren();
    const end = Math.min(S.n, (b + 1) * L);
    const done = currentBlock() !== b || k === S.steps.length;  // a final block hides what was never generated
    for (let p = b * L; p < end; p++) {
      if (done && p >= S.P && tokens[p] === MASK) continue;  // past max_new_tokens: never generated
      el.appendChild(tokenSpan(p));
    }
    return el;
  }

  function draw() {
    const box = $("text");
    const last = lastShownBlock();
    for (let b = 0; b < S.numBlocks; b++) {
      if (b > last) {
        if (rendered[b] != null) { blockEls[b].remove(); rendered[b] = null; }
        continue;
      }
      const sig = signature(b);
      if (rendered[b] === sig) continue;
      const el = drawBlock(b);
      if (!el.isConnected) box.appendChild(el);
      rendered[b] = sig;
    }
    const cur = currentBlock();
    if (cur !== null && timer && blockEls[cur]) blockEls[cur].scrollIntoView({ block: "nearest" });
    counters();
    chart();
  }

  function counters() {
    const nfe = S.nfe[k], made = Math.min(S.made[k], S.kept);
    $("step-counter").textContent = k + " / " + S.steps.length;
    const cur = currentBlock();
    $("block-counter").textContent = (cur === null ? "–" : (S.blocks.indexOf(cur) + 1)) + " / " + S.blocks.length;
    $("nfe").textContent = nfe;
    $("tokens").textContent = made;
    $("tpf").textContent = nfe ? (made / nfe).toFixed(2) : "–";
    $("step-slider").value = k;
    $("block-slider").value = cur === null ? 0 : S.blocks.indexOf(cur);
    const per = cur === null ? null : S.perBlock[cur];
    $("block-note").textContent = per
      ? "block " + (S.blocks.indexOf(cur) + 1) + ": " + per.reduce((a, b) => a + b, 0) + " tokens in " + per.length +
        " step" + (per.length > 1 ? "s" : "") + " (" + per.join(" + ") + ")"
      : "the prompt; press play";
    const end = k === S.steps.length;
    $("final").textContent = end && S.text !== undefined && S.text !== null
      ? "done: " + S.kept + " tokens in " + S.nfe[k] + " forwards, stopped at " + (S.stop_reason || "?") +
        " (the chart: tokens revealed per step, one bar per block)"
      : "";
    $("play").textContent = timer ? "⏸ pause" : "▶ play";
  }

  function chart() {
    const cv = $("chart"), ctx = cv.getContext("2d");
    const nb = S.blocks.length, wrap = $("chart-wrap").clientWidth - 14;
    const bw = barWidth = Math.max(2, Math.min(26, Math.floor(wrap / Math.max(1, nb))));
    cv.width = Math.max(wrap, nb * bw);
    const h = cv.height, unit = (h - 16) / L;
    ctx.clearRect(0, 0, cv.width, h);
    ctx.fillStyle = "#6b7280";
    ctx.font = "10px sans-serif";
    ctx.fillText("tokens revealed per step, per block (each colour band one step)", 4, 10);
    const cur = currentBlock();
    S.blocks.forEach((b, x) => {
      const per = S.perBlock[b];
      let y = h, played = b === cur ? k - (S.blockEnd[b] - per.length) : (k >= S.blockEnd[b] ? per.length : 0);
      per.forEach((n, j) => {
        const hh = n * unit;
        ctx.fillStyle = j < played ? (j % 2 ? "#93c5fd" : "#2563eb") : (j % 2 ? "#f1f5f9" : "#e2e8f0");
        ctx.fillRect(x * bw, y - hh, Math.max(1, bw - 1), hh);
        y -= hh;
      });
      if (b === cur) { ctx.strokeStyle = "#dc2626"; ctx.strokeRect(x * bw + 0.5, 12.5, Math.max(1, bw - 2), h - 13); }
    });
  }

  function stepBlock(dir) {
    const cur = currentBlock();
    const i = cur === null ? -1 : S.blocks.indexOf(cur);
    if (dir > 0) {
      if (cur !== null && k < S.blockEnd[cur]) return seek(S.blockEnd[cur]);
      const next = S.blocks[i + 1];
      return seek(next === undefined ? S.steps.length : S.blockEnd[next]);
    }
    const prev = S.blocks[i - 1];
    seek(prev === undefined ? 0 : S.blockEnd[prev]);
  }

  function tick() {
    if (k >= S.steps.length) return pause();
    if ($("mode").value === "block") stepBlock(1); else seek(k + 1);
    if (k >= S.steps.length) pause();
  }

  function play() {
    if (k >= S.steps.length) seek(0);
    clearInterval(timer);
    timer = setInterval(tick, Number($("speed").value));
    counters();
  }

  function pause() { clearInterval(timer); timer = null; if (S) counters(); }

  function select(i) {
    pause();
    S = prepare(i);
    blockEls.forEach((el) => el && el.remove());
    blockEls = []; rendered = [];
    $("step-slider").max = S.steps.length;
    $("block-slider").max = Math.max(0, S.blocks.length - 1);
    reset();
    draw();
  }

  function setup() {
    document.title = DATA.title;
    $("bl").textContent = L;
    const set = DATA.settings || {};
    $("meta").textContent = "model " + (DATA.model || "?") + " · block length " + L + " · " +
      Object.entries(set).map(([a, b]) => a + "=" + b).join(" ");
    DATA.samples.forEach((s, i) => {
      const o = document.createElement("option");
      o.value = i;
      o.textContent = i + ": " + (s.prompt_segments ? s.prompt_segments.join("") : "").slice(0, 40);
      $("sample").appendChild(o);
    });
    $("sample").onchange = (e) => select(Number(e.target.value));
    $("first").onclick = () => { pause(); seek(0); };
    $("last").onclick = () => { pause(); seek(S.steps.length); };
    $("prev-step").onclick = () => { pause(); seek(k - 1); };
    $("next-step").onclick = () => { pause(); seek(k + 1); };
    $("prev-block").onclick = () => { pause(); stepBlock(-1); };
    $("next-block").onclick = () => { pause(); stepBlock(1); };
    $("play").onclick = () => (timer ? pause() : play());
    $("speed").onchange = () => { if (timer) play(); };
    let pending = null;  // one seek per animation frame while a slider is dragged
    const later = (fn) => { if (pending === null) setTimeout(() => { const f = pending; pending = null; f(); }, 0); pending = fn; };
    $("step-slider").oninput = (e) => { const v = Number(e.target.value); pause(); later(() => seek(v)); };
    $("block-slider").oninput = (e) => {
      const b = S.blocks[Number(e.target.value)];
      pause();
      later(() => seek(S.blockEnd[b]));
    };
    $("chart").onclick = (e) => {
      const x = Math.floor(e.offsetX / barWidth);
      if (x >= 0 && x < S.blocks.length) { pause(); seek(S.blockEnd[S.blocks[x]]); }
    };
    document.addEventListener("keydown", (e) => {
      if (e.target.tagName === "SELECT" || e.target.tagName === "INPUT") return;
      const keys = { " ": () => $("play").click(), ArrowRight: () => $("next-step").click(),
        ArrowLeft: () => $("prev-step").click(), PageDown: () => $("next-block").click(),
        PageUp: () => $("prev-block").click(), Home: () => $("first").click(), End: () => $("last").click() };
      if (keys[e.key]) { e.preventDefault(); keys[e.key](); }
    });
    window.addEventListener("hashchange", fromHash);
    select(0);
    fromHash();
  }

  function fromHash() {
    const args = new URLSearchParams(location.hash.slice(1));
    if (args.has("sample")) { $("sample").value = args.get("sample"); select(Number(args.get("sample"))); }
    if (args.has("speed")) {
      const o = document.createElement("option");
      o.value = args.get("speed"); o.textContent = args.get("speed") + " ms";
      $("speed").appendChild(o); $("speed").value = o.value;
    }
    if (args.has("mode")) $("mode").value = args.get("mode");
    if (args.has("block")) {  // as the block slider does
      $("block-slider").value = args.get("block");
      $("block-slider").dispatchEvent(new Event("input"));
    }
    if (args.has("step")) {  // as the step slider does
      const v = args.get("step");
      $("step-slider").value = v === "end" ? S.steps.length : v;
      $("step-slider").dispatchEvent(new Event("input"));
    }
    if (args.has("play")) $("play").click();
  }

  setup();
})();
