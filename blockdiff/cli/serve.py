"""``blockdiff serve``: an OpenAI-compatible HTTP server for a run or model directory."""

from __future__ import annotations

from blockdiff.cli.options import add_drafter_flags, drafter_settings
from blockdiff.errors import UsageError


def run(args) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models, /health)."""
    from blockdiff.serving import serve

    if not 0 <= args.port < 65536:
        raise UsageError(f"--port must be in [0, 65536), got {args.port}")
    if args.batch_window_ms < 0 or min(args.max_batch_size, args.max_tokens_limit, args.max_prompts, args.max_queue,
                                       args.max_body_bytes) < 1:
        raise UsageError("--batch-window-ms must be >= 0; --max-batch-size, --max-tokens-limit, --max-prompts, "
                         "--max-queue and --max-body-bytes >= 1")
    knobs = drafter_settings(args)
    if not args.speculative and (args.drafter is not None or args.base is not None or knobs):
        raise UsageError("--drafter, its settings and --base choose the drafter and verifier of --speculative "
                         "decoding; add --speculative")
    if args.max_prompts > args.max_queue:
        raise UsageError(f"--max-prompts {args.max_prompts} is over --max-queue {args.max_queue}: a request that long "
                         "could never be queued; raise --max-queue or lower --max-prompts")
    serve(args.path, args.host, args.port, args.model_name, args.device, args.log_level, args.max_body_bytes,
          batch_window=args.batch_window_ms / 1000, max_batch_size=args.max_batch_size,
          max_tokens_limit=args.max_tokens_limit, max_prompts=args.max_prompts, max_queue=args.max_queue,
          lean=False if args.no_lean else None, speculative=args.speculative, drafter=args.drafter, base=args.base,
          drafter_settings=knobs)


def add_arguments(p):
    p.add_argument("path", help="run directory or its model/ folder (with --speculative also a plain decoder: a local "
                   "directory, a .gguf or smollm2)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", help="the model id clients name (default: the run or model folder's name)")
    p.add_argument("--batch-window-ms", type=float, default=10.0,
                   help="how long the oldest request waits for others with the same settings to batch with (ms)")
    p.add_argument("--max-batch-size", type=int, default=8, help="most requests generated in one batch")
    p.add_argument("--max-tokens-limit", type=int, default=2048, help="largest max_tokens a request may ask for")
    p.add_argument("--max-prompts", type=int, default=64, help="most prompts in one request (400 past it)")
    p.add_argument("--max-queue", type=int, default=1024,
                   help="most prompts waiting to be generated; a request that would pass it gets a 429")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body in bytes (413 past it)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, mps or auto")
    p.add_argument("--no-lean", action="store_true", help="on CPU, keep the plain kernels (default: fp32 weights "
                   "packed once for oneDNN; docs/generation.md)")
    p.add_argument("--speculative", action="store_true",
                   help="decode every request by lossless speculative decoding, one at a time (the verifier's own "
                   "output; the drafter only sets the speed; docs/serving.md)")
    add_drafter_flags(p)  # --drafter and each drafter knob: the server's defaults, which requests may change
    p.add_argument("--base", help="with --speculative: the verifier of a block diffuser (default: the model.pretrained "
                   "it was fine-tuned from)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
