"""Registers the optimizer's subcommands (score, prune, optimize).

Importing this module must stay cheap and torch-free: the command modules import torch
only inside their handlers, so ``pruneserve serve`` runs where torch is not installed.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``score``, ``prune`` and ``optimize`` to the top-level parser."""
    from pruneserve.optimizer import commands_optimize, commands_prune

    commands_prune.register(subparsers)
    commands_optimize.register(subparsers)
