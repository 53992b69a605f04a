"""The ``pruneserve`` command: one entry point, subcommands registered by each wing.

Each wing exposes ``register(subparsers)`` that adds its subcommands without importing
heavy dependencies; the optimizer imports torch only when one of its commands runs, so
``pruneserve serve`` works in an image without torch.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from pruneserve import __version__


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every wing's subcommands."""
    parser = argparse.ArgumentParser(
        prog="pruneserve",
        description=(
            "Make a BERT-family encoder cheap to serve: score and prune attention heads and FFN "
            "neurons, recover quality, export to ONNX, fuse, quantize to INT8, validate, and serve "
            "the result over the KServe v2 / Triton gRPC protocol."
        ),
    )
    parser.add_argument("--version", action="version", version=f"pruneserve {__version__}")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("PRUNESERVE_LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging verbosity (default: INFO, or $PRUNESERVE_LOG_LEVEL)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    from pruneserve.optimizer import cli as optimizer_cli
    from pruneserve.server import cli as server_cli

    optimizer_cli.register(sub)
    server_cli.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
