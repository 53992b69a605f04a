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
from pathlib import Path

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
    _add_log_level(parser, os.environ.get("PRUNESERVE_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    from pruneserve.optimizer import cli as optimizer_cli
    from pruneserve.server import cli as server_cli

    optimizer_cli.register(sub)
    server_cli.register(sub)
    for command in sub.choices.values():
        # Also after the subcommand; SUPPRESS keeps a value given before it when this one is absent.
        _add_log_level(command, argparse.SUPPRESS)
    return parser


def _add_log_level(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--log-level",
        default=default,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging verbosity (default: INFO, or $PRUNESERVE_LOG_LEVEL); before or after the command",
    )


def _interrupted(args: argparse.Namespace, out_existed: bool) -> str:
    """The one line for Ctrl-C: what is (not) at the command's ``--out``."""
    out = getattr(args, "out", None)
    if not isinstance(out, (str, os.PathLike)):
        return "interrupted"
    if Path(out).exists() and not out_existed:
        return f"interrupted; {out} was left incomplete: remove it before running again"
    if out_existed:
        return f"interrupted; {out} was left as it was"
    return f"interrupted; nothing was written to {out}"


#: Exit status after Ctrl-C: 128 + SIGINT, as shells report it.
EXIT_INTERRUPTED = 130


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code (130 after Ctrl-C, with one line on stderr)."""
    args = None
    out_existed = False
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        logging.basicConfig(
            level=getattr(logging, args.log_level),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        out = getattr(args, "out", None)
        out_existed = isinstance(out, (str, os.PathLike)) and Path(out).exists()
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        # Every writer stages its output beside --out and renames it into place, and scratch
        # folders are TemporaryDirectory: the traceback would only say where Ctrl-C landed.
        line = _interrupted(args, out_existed) if args is not None else "interrupted"
        # On a terminal, end the line the echoed ^C started.
        print(("\n" if sys.stderr.isatty() else "") + line, file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
