"""``pruneserve score`` and ``pruneserve prune``.

Flags map one-to-one onto :class:`~pruneserve.optimizer.config.PruneConfig` fields, applied
in this order, each overriding the one before field by field: ``--preset`` (default
``default``), then ``--config file.yaml`` (its relative ``data.path`` is relative to the YAML
file's folder), then the individual flags. torch is imported only inside the handlers. A user
error prints one ``error:`` line (naming the flag when a flag's value is refused), writes
nothing and exits 2. ``--out``
is checked (:func:`pruneserve.outputs.check_output_dir`) before the model loads and written
whole or not at all (:func:`pruneserve.outputs.atomic_output_dir`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from pruneserve.artifact import ArtifactError
from pruneserve.optimizer.cli_args import (
    EXIT_USER_ERROR,
    add_importance_flags,
    add_model_and_data_flags,
    config_flags,
    error_line,
    flag_overrides,
    prune_config_fields,
    read_yaml,
    show_progress,
)
from pruneserve.optimizer.config import PRESETS, PruneConfig, no_recovery, preset
from pruneserve.optimizer.errors import OptimizerError
from pruneserve.outputs import atomic_output_dir, check_output_dir, weights_bytes

logger = logging.getLogger(__name__)

_SCORE_HELP = """\
Measure how much each attention head and FFN neuron matters (Michel et al., 2019): the
gradient of a loss with respect to a gate on each unit, summed over the scoring data.
Writes importance.json (scores per layer) and importance.png (a heatmap).

examples:
  pruneserve score --out scores/                       # the default model and corpus
  pruneserve score --model ./my-model --data traffic.jsonl --out scores/
"""

_PRUNE_HELP = """\
Remove attention heads and/or FFN neurons, then recover quality (least-squares refit of the
output projections, then optional distillation), measured against the original model on
held-out data. Writes a pruned checkpoint (model.safetensors, tokenizer.json, pruning.json
with kept heads per layer, quality before/after recovery, params and FLOPs before/after)
plus importance.png and tradeoff.png.

Quality is the mean cosine similarity to the original embeddings (embedding models) or
1 - accuracy drop (classifiers). It holds best on text like the calibration data: pass
--data with a sample of your own traffic.

examples:
  pruneserve prune --out pruned/                       # 50% of heads, refit + distillation
  pruneserve prune --heads 0.25 --no-recovery --out pruned/
  pruneserve prune --quality-floor 0.95 --out pruned/  # as much as quality 0.95 allows
  pruneserve prune --model ./my-model --data traffic.txt --preset aggressive --out pruned/
  pruneserve score --out scores/ && pruneserve prune --scores scores/ --out pruned/
  pruneserve optimize --from-pruned pruned/ --out artifact/   # finish: export, quantize, validate

Settings: the preset is the base, --config FILE.yaml overrides it field by field, flags override
both. A relative data.path in the YAML file is relative to the YAML file's folder; paths given
as flags are relative to the current folder. pruning.json records the resolved settings.
"""



def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``score`` and ``prune`` to the top-level parser."""
    score = subparsers.add_parser(
        "score", help="score attention heads and FFN neurons by importance",
        description=_SCORE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_and_data_flags(score)
    add_importance_flags(score)
    score.add_argument("--out", required=True, type=Path, help="folder for importance.json and importance.png")
    score.add_argument("--overwrite", action="store_true",
                       help="replace an existing --out that `pruneserve score` wrote (never any other folder)")
    score.set_defaults(func=run_score, config_flags=config_flags(score, prune_config_fields()))

    prune = subparsers.add_parser(
        "prune", help="prune heads/FFN neurons and recover quality",
        description=_PRUNE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_and_data_flags(prune)
    prune.add_argument("--preset", choices=PRESETS, default="default",
                       help="starting settings: light (25%% heads, refit), default (50%% heads, refit + "
                            "150 distillation steps), aggressive (50%% heads + 25%% FFN); default: default")
    prune.add_argument("--config", type=Path, metavar="FILE.yaml",
                       help="YAML with sections data/importance/budget/recovery: overrides the preset field by "
                            "field; flags override it; a relative data.path is relative to the YAML's folder")
    prune.add_argument("--scores", type=Path, metavar="DIR",
                       help="the --out folder of `pruneserve score` on the same model: its importance.json are "
                            "the search's first scores (later steps re-score)")
    budget = prune.add_argument_group("budget (what to remove)")
    budget.add_argument("--heads", type=float, dest="head_fraction", metavar="F",
                        help="fraction of all attention heads to remove, e.g. 0.5")
    budget.add_argument("--ffn", type=float, dest="ffn_fraction", metavar="F",
                        help="fraction of all FFN neurons to remove, e.g. 0.25")
    budget.add_argument("--quality-floor", type=float, dest="quality_floor", metavar="Q",
                        help="remove as much compute as keeps quality >= Q on held-out data; --heads/--ffn "
                             "(or the preset's) become upper limits")
    budget.add_argument("--step-fraction", type=float, dest="step_fraction", metavar="F",
                        help="remove this fraction per search step, re-scoring in between (default 0.1)")
    budget.add_argument("--cost", choices=("flops", "count"), help="rank by importance per FLOP (default) or per unit")
    budget.add_argument("--protect-layers", type=int, nargs="*", dest="protected_layers", metavar="L",
                        help="layers that keep at least one head and neuron (default: -1, the last)")
    add_importance_flags(prune)
    recovery = prune.add_argument_group("recovery")
    recovery.add_argument("--no-recovery", action="store_true", help="skip refit and distillation")
    recovery.add_argument("--no-ffn-refit", action="store_false", dest="refit_ffn", default=None,
                          help="refit only the attention output projections")
    recovery.add_argument("--ridge-alpha-scale", type=float, dest="ridge_alpha_scale", metavar="A",
                          help="ridge strength toward the original weights, x mean Gram diagonal (default 0.1)")
    recovery.add_argument("--distill-steps", type=int, dest="distill_steps", metavar="N",
                          help="distillation steps after the refit (0 = none)")
    recovery.add_argument("--distill-epochs", type=float, dest="distill_epochs", metavar="E",
                          help="distillation passes over the scoring data (instead of --distill-steps)")
    recovery.add_argument("--lr", type=float, help="distillation peak learning rate (default 1.5e-4)")
    recovery.add_argument("--lr-schedule", choices=("cosine", "constant"), dest="lr_schedule",
                          help="cosine: decay the rate to 0 over the steps (default); constant: keep it")
    recovery.add_argument("--distill-hidden-weight", type=float, dest="distill_hidden_weight", metavar="W",
                          help="weight of the token-level term (last hidden states) beside the pooled "
                               "output (default 1; 0 = pooled output only)")
    prune.add_argument("--out", required=True, type=Path, help="folder for the pruned checkpoint and report")
    prune.add_argument("--overwrite", action="store_true",
                       help="replace an existing --out that `pruneserve prune` wrote (never any other folder)")
    prune.set_defaults(func=run_prune, config_flags=config_flags(prune, prune_config_fields()))


def build_prune_config(args: argparse.Namespace) -> PruneConfig:
    """Preset, then ``--config``, then flags (see the module docstring)."""
    config = preset(args.preset)
    if args.config is not None:
        config = PruneConfig.from_dict(read_yaml(args.config, (("data", "path"),)), base=config)
    config = PruneConfig.from_dict(flag_overrides(args), base=config)
    if args.no_recovery:
        config = PruneConfig(config.data, config.importance, config.budget, no_recovery())
    return config


def _fail(exc: OptimizerError | ArtifactError, args: argparse.Namespace) -> int:
    print(error_line(exc, args), file=sys.stderr)
    return EXIT_USER_ERROR


#: What ``score`` writes (importance.json, a heatmap) and what ``prune`` writes beyond the pruned
#: weights (at most the source's size in fp32): tokenizer, pruning.json, figures.
_SCORES_BYTES = 8 << 20
_PRUNED_MARGIN = 16 << 20


def _output_inputs(args: argparse.Namespace) -> dict[str, Any]:
    """The inputs ``--out`` must stay clear of, by flag (the bundled model when --model is not given)."""
    model = args.model
    if model is None:
        from pruneserve.optimizer.adapters import default_model_dir

        model = default_model_dir()
    return {"--model": model, "--data": args.path, "--config": getattr(args, "config", None),
            "--scores": getattr(args, "scores", None)}


def _check_out(args: argparse.Namespace, kind: str) -> dict[str, Any]:
    """Refuse an unsafe, occupied or unwritable ``--out`` before any model loads; returns the inputs."""
    inputs = _output_inputs(args)
    expected = _SCORES_BYTES if kind == "scores" else weights_bytes(inputs["--model"]) + _PRUNED_MARGIN
    check_output_dir(args.out, overwrite=args.overwrite, kind=kind, inputs=inputs, expected_bytes=expected)
    return inputs


def run_score(args: argparse.Namespace) -> int:
    """Handler of ``pruneserve score``."""
    try:
        inputs = _check_out(args, "scores")
        overrides = flag_overrides(args)
        config = PruneConfig.from_dict({k: v for k, v in overrides.items() if k in ("data", "importance")})
        from pruneserve.optimizer.adapters import load_model
        from pruneserve.optimizer.pruner import score_model

        started = time.perf_counter()
        progress = show_progress(args)
        loaded = load_model(args.model, pooling=args.pooling, normalize=args.normalize_embeddings)
        importance, split = score_model(loaded, config.data, config.importance, progress=progress)
    except (OptimizerError, ArtifactError) as exc:
        return _fail(exc, args)
    from pruneserve.optimizer import plots

    document = {
        "model": loaded.name,
        "model_sha256": loaded.source_sha256,
        "data": split.source,
        **importance.to_dict(),
    }
    try:
        with atomic_output_dir(args.out, kind="scores", overwrite=args.overwrite, inputs=inputs) as staged:
            (staged / "importance.json").write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
            plots.importance_heatmap(importance, staged / "importance.png", title=loaded.name)
    except ArtifactError as exc:
        return _fail(exc, args)
    heads = importance.heads
    print(f"scored {heads.shape[0]} layers x {heads.shape[1]} heads and {importance.ffn.shape[1]} FFN neurons "
          f"per layer on {importance.examples} examples in {time.perf_counter() - started:.1f} s")
    print(f"wrote {args.out / 'importance.json'} and {args.out / 'importance.png'}")
    return 0


def run_prune(args: argparse.Namespace) -> int:
    """Handler of ``pruneserve prune``."""
    try:
        inputs = _check_out(args, "pruned")
        config = build_prune_config(args)
        from pruneserve.optimizer.adapters import load_model
        from pruneserve.optimizer.pruner import load_scores, run_pruning

        started = time.perf_counter()
        progress = show_progress(args)
        loaded = load_model(args.model, pooling=args.pooling, normalize=args.normalize_embeddings)
        scores = None if args.scores is None else load_scores(args.scores, loaded, config.importance)
        result = run_pruning(loaded, config, progress=progress, scores=scores,
                             scores_from=None if args.scores is None else os.path.abspath(args.scores))
    except (OptimizerError, ArtifactError) as exc:
        return _fail(exc, args)
    from pruneserve.optimizer import plots
    from pruneserve.optimizer.checkpoint import save_pruned
    from pruneserve.optimizer.report import final_quality_points

    record = result.record()
    record["timings_s"]["total"] = round(time.perf_counter() - started, 2)
    head_mask, _ = result.plan.to_masks(loaded.encoder.spec)
    try:
        with atomic_output_dir(args.out, kind="pruned", overwrite=args.overwrite, inputs=inputs) as staged:
            save_pruned(result.encoder, staged, plan=result.plan, record=record, tokenizer=loaded.tokenizer)
            plots.importance_heatmap(result.importance, staged / "importance.png", head_mask=head_mask,
                                     ffn_kept=result.plan.ffn, title=loaded.name)
            plots.tradeoff_curve(result.trace, staged / "tradeoff.png", floor=config.budget.quality_floor,
                                 after=final_quality_points(result))
    except (OptimizerError, ArtifactError) as exc:
        return _fail(exc, args)
    print(f"kept heads per layer {record['heads_per_layer']}, FFN per layer {record['ffn_per_layer']}")
    for stage in result.recovery:
        print(f"  {stage.method:<16} {stage.quality.describe()}  ({stage.seconds:.0f} s)")
    print(f"params {result.params_before:,} -> {result.params_after:,}; FLOPs at {result.flops_seq_len} tokens "
          f"{result.flops_before / 1e9:.2f} G -> {result.flops_after / 1e9:.2f} G")
    print(f"quality measured on {result.eval_examples} held-out examples from {result.data_source}")
    print(f"wrote {args.out} in {record['timings_s']['total']:.0f} s")
    return 0
