"""`eft-fast serve`: the OpenAI-compatible server on the command line.

    eft-fast serve --knowledge K --tuned T --reference R [--served-model-name NAME]
                   [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--max-waiting N] [engine options]

SIGTERM or SIGINT: the server stops accepting connections, ends the requests in flight (their
clients get an error event or a 503), closes the engine and exits with status 0.
"""
from __future__ import annotations

import os
import sys

from ..cli_engine import UsageError, add_engine_arguments, add_model_arguments, build_engine, check_device, name_flag, \
    one_line



def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve an EFT engine over the OpenAI HTTP API",
                       description="An OpenAI-compatible server (/v1/completions, /v1/chat/completions, /v1/models, "
                                   "/health, /metrics) over knowledge + (tuned - reference). Needs the serve extra: "
                                   "pip install 'eft_fast[serve]'.")
    add_model_arguments(p)
    add_engine_arguments(p)
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients use (default: the --tuned model's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("EFT_FAST_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $EFT_FAST_API_KEY, else none)")
    p.add_argument("--max-waiting", type=int, default=None,
                   help="answer 503 (Retry-After) while this many requests wait for their first token")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)


def _usage_error(error: BaseException) -> int:
    print(f"eft-fast serve: error: {one_line(error)}", file=sys.stderr)
    return 2


def _check_options(args) -> None:
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_waiting is not None and args.max_waiting < 0:
        raise UsageError(f"--max-waiting must be >= 0, got {args.max_waiting}")
    if args.api_key is not None and not args.api_key.strip():
        raise UsageError("--api-key is empty")
    check_device(args.device)


def _default_name(args) -> str:
    tuned = args.tuned[0] if args.tuned else (args.knowledge or "eft")
    return os.path.basename(os.path.normpath(str(tuned))) or str(tuned)


def cmd_serve(args) -> int:
    """Build the engine, serve until SIGTERM / SIGINT; 0 on a clean stop, 2 for a usage error."""
    try:
        from .server import serve
    except ImportError as e:
        return _usage_error(UsageError(f"the server needs the serve extra (pip install 'eft_fast[serve]'): {e}"))
    from ..engine.async_engine import AsyncEFTEngine

    try:
        _check_options(args)
        engine = build_engine(args)
    except UsageError as e:
        return _usage_error(e)
    except (ValueError, TypeError, OSError) as e:          # bad models, options or formats
        return _usage_error(UsageError(name_flag(one_line(e))))
    if engine.tokenizer is None:
        engine.close()
        return _usage_error(UsageError("the models have no tokenizer; pass --tokenizer"))
    serve(AsyncEFTEngine(engine, max_waiting=args.max_waiting),
          served_model_name=args.served_model_name or _default_name(args), host=args.host, port=args.port,
          api_key=args.api_key, log_level=args.log_level)
    return 0
