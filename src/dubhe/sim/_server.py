"""Running the simulator under uvicorn with the fastest settings available."""

from __future__ import annotations

import socket
import sys

import uvicorn

from dubhe.sim._app import create_app

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9100


def serve(
    host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *, tokens_per_second: float | None = None
) -> None:
    """Serve the simulator until interrupted (blocking).

    The socket is bound before uvicorn starts so the announced address is real:
    with ``port=0`` the line on stderr carries the port the OS picked.
    """
    app = create_app(tokens_per_second=tokens_per_second)
    config = uvicorn.Config(
        app,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_level="warning",
        server_header=False,
    )
    listener = _bind(host, port)
    bound_port = listener.getsockname()[1]
    shown_host = f"[{host}]" if ":" in host else host
    print(f"dubhe upstream-sim listening on http://{shown_host}:{bound_port}/v1",
          file=sys.stderr, flush=True)  # fmt: skip
    uvicorn.Server(config).run(sockets=[listener])


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.set_inheritable(True)
    return listener
