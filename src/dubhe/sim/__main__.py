"""``python -m dubhe.sim``: run the OpenAI-compatible upstream simulator."""

from __future__ import annotations

import argparse

from dubhe.sim._server import DEFAULT_HOST, DEFAULT_PORT, serve


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="dubhe upstream-sim", description="OpenAI-compatible upstream simulator."
    )
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port")
    parser.add_argument(
        "--tokens-per-second",
        type=float,
        default=None,
        help="pace streamed token chunks (default: as fast as possible)",
    )
    args = parser.parse_args(argv)
    if args.tokens_per_second is not None and args.tokens_per_second <= 0:
        parser.error("--tokens-per-second must be positive")
    serve(args.host, args.port, tokens_per_second=args.tokens_per_second)


if __name__ == "__main__":
    main()
