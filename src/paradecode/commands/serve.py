"""`paradecode serve`: the HTTP API (see :mod:`paradecode.server.app`)."""

from __future__ import annotations

from ._common import add_model_args, model_from_args


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve the HTTP API (POST /v1/generate, and OpenAI's /v1/chat/completions and /v1/completions)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    add_model_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import uvicorn

    from ..errors import UserError
    from ..server import create_app

    if not 0 < args.port < 65536:
        raise UserError(f"port {args.port} is out of range", "pass --port between 1 and 65535")
    _check_can_listen(args.host, args.port)              # before loading the model, in one line
    model = model_from_args(args)
    uvicorn.run(create_app(model), host=args.host, port=args.port, log_level="info")
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
