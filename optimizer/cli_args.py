"""Command-line pieces shared by ``pruneserve score``, ``prune`` and ``optimize``.

The flags for the model and its calibration data, the importance-scoring flags, the map
from those flags onto :class:`~pruneserve.optimizer.config.PruneConfig` sections, and the
``--config FILE.yaml`` reader. One definition, so the three commands cannot drift apart.
No torch here: these run before any handler imports it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pruneserve.optimizer.errors import ConfigError

#: Exit status of every optimizer command for a problem the user can fix (bad flag, data, floor).
EXIT_USER_ERROR = 2

DATA_HELP = (
    "calibration text: JSON Lines with 'text' (optional 'text_pair', 'label') or plain text, one "
    "example per line (default: a bundled English corpus from the Python documentation)"
)

#: config section -> {argparse dest: config field}; the dest is the field's name unless it would clash.
FLAG_SECTIONS: dict[str, dict[str, str]] = {
    "data": {n: n for n in ("path", "eval_fraction", "max_examples", "max_length", "batch_size", "seed")},
    "importance": {"method": "method", "normalize": "normalize", "loss": "loss", "temperature": "temperature",
                   "score_examples": "max_examples"},
    "budget": {n: n for n in ("head_fraction", "ffn_fraction", "quality_floor", "step_fraction", "cost",
                              "protected_layers")},
    "recovery": {n: n for n in ("refit_ffn", "ridge_alpha_scale", "distill_steps", "distill_epochs", "lr",
                                "lr_schedule", "distill_hidden_weight")},
}


def add_model_and_data_flags(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--data`` and the data-split flags (``PruneConfig.data``), plus ``--no-progress``."""
    parser.add_argument("--model", type=Path, metavar="DIR",
                        help="Hugging Face model folder (default: the bundled all-MiniLM-L6-v2)")
    parser.add_argument("--data", type=str, dest="path", metavar="FILE", help=DATA_HELP)
    parser.add_argument("--eval-fraction", type=float, dest="eval_fraction", metavar="F",
                        help="share of the data held out to measure quality (default 0.25)")
    parser.add_argument("--max-examples", type=int, dest="max_examples", metavar="N",
                        help="use at most N examples in total (default 2000)")
    parser.add_argument("--max-length", type=int, dest="max_length", metavar="N",
                        help="truncate texts to N tokens (default 128)")
    parser.add_argument("--batch-size", type=int, dest="batch_size", metavar="N", help="default 32")
    parser.add_argument("--seed", type=int, help="seed of the data split and distillation order (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_importance_flags(parser: argparse.ArgumentParser) -> None:
    """The importance-scoring flags (``PruneConfig.importance``)."""
    group = parser.add_argument_group("importance scoring")
    group.add_argument("--method", choices=("michel", "fisher"),
                       help="michel: sum of |dL/dgate| (default); fisher: sum of squared gradients")
    group.add_argument("--normalize", choices=("global", "layer"),
                       help="global: one ranking across layers (default); layer: L2-normalise per layer")
    group.add_argument("--loss", choices=("auto", "cross_entropy", "contrastive"),
                       help="auto: cross-entropy for classifiers, contrastive vs the original for embeddings")
    group.add_argument("--temperature", type=float, help="contrastive loss temperature (default 0.05)")
    group.add_argument("--score-examples", type=int, dest="score_examples", metavar="N",
                       help="texts per scoring pass (default 512; the search re-scores after every step)")


def flag_overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """``{section: {field: value}}`` of :data:`FLAG_SECTIONS` for every flag the user actually gave."""
    out: dict[str, dict[str, Any]] = {}
    for section, names in FLAG_SECTIONS.items():
        given = {field: getattr(args, dest) for dest, field in names.items() if getattr(args, dest, None) is not None}
        if given:
            out[section] = given
    return out


def read_yaml(path: Path) -> dict[str, Any]:
    """The mapping in a ``--config`` YAML file (empty file: ``{}``); :class:`ConfigError` otherwise."""
    import yaml

    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read --config {path}: {exc.strerror}; pass an existing YAML file") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path} is not valid YAML: {exc}") from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path} must hold a mapping with sections data/importance/budget/recovery")
    return raw


__all__ = [
    "DATA_HELP",
    "EXIT_USER_ERROR",
    "FLAG_SECTIONS",
    "add_importance_flags",
    "add_model_and_data_flags",
    "flag_overrides",
    "read_yaml",
]
