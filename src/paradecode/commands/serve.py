"""`paradecode serve`: the HTTP API (see :mod:`paradecode.server.app`)."""

from __future__ import annotations

import os

from ._common import add_model_args, model_from_args


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve the HTTP API (POST /v1/generate, and OpenAI's /v1/chat/completions "
                                     "and /v1/completions)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("PARADECODE_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' on every request but GET /health "
                        "(default: $PARADECODE_API_KEY; none: open)")
    p.add_argument("--draft-model", action="append", default=[], metavar="PATH",
                   help="a draft model that requests may name in the draft method's draft_model option "
                        "(repeatable; without it, requests cannot make the server load a file)")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import uvicorn

    from ..errors import UserError
    from ..server import create_app

    if args.api_key is not None and not args.api_key.strip():
        raise UserError("--api-key is empty", "pass a non-empty key, or leave --api-key out for an open server")
    if not 0 < args.port < 65536:
        raise UserError(f"port {args.port} is out of range", "pass --port between 1 and 65535")
    from ..models.loading import check_model_path

    for path in args.draft_model:
        check_model_path(path, "--draft-model", "draft model")
    _check_can_listen(args.host, args.port)              # before loading the model, in one line
    model = model_from_args(args)
    app = create_app(model, api_key=args.api_key, draft_models=args.draft_model)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def _check_can_listen(host: str, port: int) -> None:
    import socket

    from ..errors import UserError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UserError(f"cannot resolve --host {host}: {e.strerror}", "pass an address such as 127.0.0.1") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)        # as uvicorn binds
        try:
            s.bind(address)
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port}: {e.strerror}",
                            "pick another --port, or stop what is listening there") from None
