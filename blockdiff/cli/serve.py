"""``blockdiff serve``: an OpenAI-compatible HTTP server for a run or model directory."""

from __future__ import annotations

from blockdiff.errors import UsageError


def run(args) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models, /health)."""
    from blockdiff.serving import serve

    if not 0 <= args.port < 65536:
        raise UsageError(f"--port must be in [0, 65536), got {args.port}")
    if args.batch_window_ms < 0 or args.max_batch_size < 1 or args.max_tokens_limit < 1:
        raise UsageError("--batch-window-ms must be >= 0; --max-batch-size and --max-tokens-limit >= 1")
    serve(args.path, args.host, args.port, args.model_name, args.device, args.log_level,
          batch_window=args.batch_window_ms / 1000, max_batch_size=args.max_batch_size,
          max_tokens_limit=args.max_tokens_limit)


def add_arguments(p):
    p.add_argument("path", help="run directory or its model/ folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", help="the model id clients name (default: the run or model folder's name)")
    p.add_argument("--batch-window-ms", type=float, default=10.0,
                   help="how long the oldest request waits for others with the same settings to batch with (ms)")
    p.add_argument("--max-batch-size", type=int, default=8, help="most requests generated in one batch")
    p.add_argument("--max-tokens-limit", type=int, default=2048, help="largest max_tokens a request may ask for")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, mps or auto")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
