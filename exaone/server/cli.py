"""`exaone serve`: the OpenAI-compatible API (with the playground at /) over one local model, or,
with `--upstream URL` (repeatable), in front of OpenAI-compatible engines such as vLLM (upstream.py).

Keys live in the ledger (`exaone keys create NAME`); without keys the server refuses to start
unless `--no-auth` says that serving everyone is meant.
"""
from __future__ import annotations

import sys


def add_arguments(p) -> None:
    from ..commands.generate import add_model_arguments

    add_model_arguments(p)  # --model, --dtype, --device, --quantize, --compile, --draft-model: as generate/chat
    p.add_argument("--name", "--model-name", dest="name", default=None,
                   help="model id clients send (default: the checkpoint folder's name, or the upstream's model)")
    p.add_argument("--upstream", action="append", default=None, metavar="URL",
                   help="serve through an OpenAI-compatible engine at URL (e.g. http://gpu1:8000/v1) instead of "
                        "a local model; repeat to balance across several")
    p.add_argument("--upstream-key", default=None, metavar="KEY",
                   help="API key sent to the upstream engines (default: $EXAONE_UPSTREAM_KEY)")
    p.add_argument("--upstream-reasoning", default="auto", choices=("auto", "upstream", "front"),
                   help="who splits reasoning from the answer: the engine (vLLM --reasoning-parser), the front "
                        "(raw <think> text), or auto (per request)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--db", default=None, metavar="URL",
                   help="ledger database URL (default: $EXAONE_DB_URL, else sqlite:///exaone.db in the current directory)")
    p.add_argument("--no-auth", action="store_true", help="serve without API keys (usage is still recorded)")
    p.add_argument("--max-batch", type=int, default=16, metavar="N", help="sequences decoded together")
    p.add_argument("--max-len", type=int, default=None, metavar="N", help="context length (default: the model's)")
    p.add_argument("--prefix-cache-mb", type=int, default=None, metavar="MB",
                   help="memory for reusing the KV of repeated prompt prefixes (0: off; default: the engine's)")
    p.add_argument("--prices", default=None, metavar="FILE", help="prices per model, .json or .toml (see pricing.py)")
    p.add_argument("--cors", action="append", default=None, metavar="ORIGIN",
                   help="let web pages from ORIGIN call the API (repeatable; '*' for any)")
    p.add_argument("--log-level", default="info")


def local_backend(args):
    """The LocalBackend that the flags describe (not started)."""
    from .backend import LocalBackend

    backend = LocalBackend(args.model, dtype=args.dtype, quantize=args.quantize, max_batch=args.max_batch, device=args.device,
                           max_len=args.max_len, name=args.name,
                           prefix_cache_bytes=None if args.prefix_cache_mb is None else args.prefix_cache_mb * 2**20,
                           draft_model=args.draft_model, num_speculative_tokens=args.num_speculative_tokens,
                           draft_quantize=args.draft_quantize)
    if getattr(args, "compile", False):
        backend.engine.enable_compile()
    return backend


def run(args) -> int:
    if args.upstream and args.draft_model:
        print("exaone serve: --draft-model drafts for a local model; it cannot be used with --upstream", file=sys.stderr)
        return 2
    import uvicorn

    from .app import create_app
    from .ledger import Ledger
    from .limits import Limiter
    from .pricing import Pricing

    pricing = Pricing.from_file(args.prices) if args.prices else Pricing()
    ledger = Ledger(args.db, pricing=pricing)
    if not args.no_auth and not ledger.list_keys(include_revoked=False):
        print(f"exaone serve: no API keys in {ledger.display_url}. Create one with\n"
              f"    exaone keys create NAME{'' if args.db is None else ' --db ' + args.db}\n"
              f"or serve without keys with --no-auth.", file=sys.stderr)
        return 2
    if args.upstream:
        import os

        from .upstream import UpstreamBackend
        try:
            backend = UpstreamBackend(args.upstream, api_key=args.upstream_key or os.environ.get("EXAONE_UPSTREAM_KEY"),
                                      name=args.name, reasoning=args.upstream_reasoning).start()
        except RuntimeError as e:
            print(f"exaone serve: {e}", file=sys.stderr)
            return 2
    else:
        backend = local_backend(args).start()
    app = create_app(backend, ledger=ledger, no_auth=args.no_auth, limiter=Limiter(ledger), cors_origins=args.cors)
    print(f"exaone serve: {backend.model_name} on http://{args.host}:{args.port}  (playground at /, "
          f"ledger {ledger.display_url}{', no auth' if args.no_auth else ''})", file=sys.stderr)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        backend.stop()
        ledger.close()
    return 0
