"""Command-line pieces shared by ``pruneserve score``, ``prune`` and ``optimize``.

The flags for the model and its calibration data, the importance-scoring flags, the map
from those flags onto :class:`~pruneserve.optimizer.config.PruneConfig` sections, and the
``--config FILE.yaml`` reader. One definition, so the three commands cannot drift apart.
No torch here: these run before any handler imports it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pruneserve.optimizer.config import absolute_path
from pruneserve.artifact import POOLINGS
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
    "importance": {"method": "method", "head_ranking": "normalize", "loss": "loss", "temperature": "temperature",
                   "score_examples": "max_examples"},
    "budget": {n: n for n in ("head_fraction", "ffn_fraction", "quality_floor", "step_fraction", "cost",
                              "protected_layers")},
    "recovery": {n: n for n in ("refit_ffn", "ridge_alpha_scale", "distill_steps", "distill_epochs", "lr",
                                "lr_schedule", "distill_hidden_weight")},
}


#: Values of the importance ranking's old flag, ``--normalize``, now ``--head-ranking``.
_OLD_RANKING_VALUES = ("global", "layer")


def add_model_and_data_flags(parser: argparse.ArgumentParser) -> None:
    """``--model``, the embedding's ``--pooling`` and ``--normalize``/``--no-normalize`` (dests
    ``pooling`` and ``normalize_embeddings``, ``None`` unless given: the model folder decides),
    ``--data`` and the data-split flags (``PruneConfig.data``), plus ``--no-progress``."""
    parser.add_argument("--model", type=Path, metavar="DIR",
                        help="Hugging Face model folder (default: the bundled all-MiniLM-L6-v2)")
    parser.add_argument("--pooling", choices=POOLINGS,
                        help="how an embedding model pools its token states (default: what the folder's "
                             "sentence-transformers files say, else mean)")
    parser.add_argument("--normalize", action=argparse.BooleanOptionalAction, dest="normalize_embeddings",
                        help="L2-normalise the embedding, or not (default: normalise if the folder lists a "
                             "sentence-transformers Normalize module)")
    _refuse_old_ranking_spelling(parser)
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
    group.add_argument("--head-ranking", choices=("global", "layer"), dest="head_ranking",
                       help="global: rank heads and neurons across all layers on raw scores (default); layer: "
                            "L2-normalise each layer's scores first (YAML importance.normalize; was --normalize)")
    group.add_argument("--loss", choices=("auto", "cross_entropy", "contrastive"),
                       help="auto: cross-entropy for classifiers, contrastive vs the original for embeddings")
    group.add_argument("--temperature", type=float, help="contrastive loss temperature (default 0.05)")
    group.add_argument("--score-examples", type=int, dest="score_examples", metavar="N",
                       help="texts per scoring pass (default 512; the search re-scores after every step)")


def _refuse_old_ranking_spelling(parser: argparse.ArgumentParser) -> None:
    """Make ``--normalize global|layer`` (the head ranking's old spelling) name ``--head-ranking``.

    ``--normalize`` now takes no value, so argparse would only report the stray word as an
    "unrecognized argument" from the top-level parser; the check runs before the subcommand's
    own parsing (argparse calls ``parse_known_args`` of each subparser) to say what to type.
    """
    parse_known_args = parser.parse_known_args

    def checked(args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        for i, arg in enumerate(argv):
            if arg == "--":
                break
            value = arg.partition("=")[2] if arg.startswith("--normalize=") else (
                argv[i + 1] if arg == "--normalize" and i + 1 < len(argv) else None)
            if value in _OLD_RANKING_VALUES:
                parser.error(f"--normalize {value} is the old spelling of the importance ranking: use "
                             f"--head-ranking {value} (--normalize now L2-normalises the embeddings)")
        return parse_known_args(args, namespace)

    parser.parse_known_args = checked  # type: ignore[method-assign]


def flag_overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """``{section: {field: value}}`` of :data:`FLAG_SECTIONS` for every flag the user actually gave."""
    out: dict[str, dict[str, Any]] = {}
    for section, names in FLAG_SECTIONS.items():
        given = {field: getattr(args, dest) for dest, field in names.items() if getattr(args, dest, None) is not None}
        if given:
            out[section] = given
    return out


def read_yaml(path: Path, paths: Sequence[tuple[str, ...]] = ()) -> dict[str, Any]:
    """The mapping in a ``--config`` YAML file (empty file: ``{}``); :class:`ConfigError` otherwise.

    ``paths`` are the key paths (``("prune", "data", "path")``) that hold file or folder names:
    a relative one is made absolute relative to the YAML file's folder, as paths read from a
    file usually are (paths given as flags are relative to the current directory).
    """
    raw = _read_mapping(path)
    folder = Path(os.path.abspath(path)).parent
    for keys in paths:
        holder: Any = raw
        for key in keys[:-1]:
            holder = holder.get(key) if isinstance(holder, dict) else None
        if isinstance(holder, dict) and isinstance(holder.get(keys[-1]), str) and holder[keys[-1]]:
            holder[keys[-1]] = absolute_path(holder[keys[-1]], folder, key=".".join(keys))
    return raw


def _read_mapping(path: Path) -> dict[str, Any]:
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


def merge_section(base: Any, override: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``base`` (a config section from a preset or a YAML file; ``None`` = empty) with
    ``override``'s fields replacing its own, field by field; a non-mapping on either side is refused."""
    for side in (base, override):
        if side is not None and not isinstance(side, Mapping):
            raise ConfigError(f"{where} must be a mapping of settings, got {type(side).__name__}")
    return {**(base or {}), **override}


def config_flags(parser: argparse.ArgumentParser, fields: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """``{config key: (argparse dest, flag)}`` for ``fields`` (``{config key: dest}``), the flag
    spelled as the parser defines it (``budget.head_fraction`` -> ``("head_fraction", "--heads")``).

    Stored on the parsed arguments (``set_defaults(config_flags=...)``) so that
    :func:`error_line` can name the flag the user typed when a value from it is refused.
    """
    options = {a.dest: max(a.option_strings, key=len) for a in parser._actions if a.option_strings}
    return {key: (dest, options[dest]) for key, dest in fields.items() if dest in options}


def prune_config_fields() -> dict[str, str]:
    """``{config key: dest}`` of the :data:`FLAG_SECTIONS` flags (``budget.head_fraction``: ``head_fraction``)."""
    return {f"{section}.{name}": dest for section, names in FLAG_SECTIONS.items() for dest, name in names.items()}


def error_line(exc: Exception, args: argparse.Namespace) -> str:
    """The one ``error: ...`` line for ``exc``; a :class:`ConfigError` about a value the user gave as
    a flag names that flag and the value first (``error: --heads 1.5: budget.head_fraction=1.5 ...``)."""
    dest_flag = getattr(args, "config_flags", {}).get(getattr(exc, "key", None))
    if dest_flag is not None:
        dest, flag = dest_flag
        value = getattr(args, dest, None)
        if value is not None:
            if isinstance(value, bool):
                return f"error: {flag}: {exc}"
            shown = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
            return f"error: {flag} {shown}: {exc}"
    return f"error: {exc}"


def show_progress(args: argparse.Namespace) -> bool:
    """Whether to draw progress bars, applied to the libraries that draw their own (transformers'
    weight loading): only on a terminal, since tqdm's redraws fill CI and Kubernetes logs;
    ``--no-progress`` turns them off on a terminal too. Call it before the model loads."""
    progress = not getattr(args, "no_progress", False) and sys.stderr.isatty()
    from transformers.utils import logging as transformers_logging

    if progress:
        transformers_logging.enable_progress_bar()
    else:
        transformers_logging.disable_progress_bar()
    return progress


__all__ = [
    "DATA_HELP",
    "EXIT_USER_ERROR",
    "FLAG_SECTIONS",
    "add_importance_flags",
    "add_model_and_data_flags",
    "config_flags",
    "error_line",
    "flag_overrides",
    "merge_section",
    "prune_config_fields",
    "read_yaml",
    "show_progress",
]
