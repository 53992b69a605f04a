"""``pruneserve score`` and ``pruneserve prune``.

Flags map one-to-one onto :class:`~pruneserve.optimizer.config.PruneConfig` fields, applied
in this order: ``--preset`` (default ``default``), then ``--config file.yaml``, then the
individual flags. torch is imported only inside the handlers. A user error prints the
:class:`~pruneserve.optimizer.errors.OptimizerError` message, writes nothing and exits 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from pruneserve.optimizer.cli_args import (
    EXIT_USER_ERROR,
    add_importance_flags,
    add_model_and_data_flags,
    flag_overrides,
    read_yaml,
)
from pruneserve.optimizer.config import PRESETS, PruneConfig, no_recovery, preset
from pruneserve.optimizer.errors import OptimizerError

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
    score.set_defaults(func=run_score)

    prune = subparsers.add_parser(
        "prune", help="prune heads/FFN neurons and recover quality",
        description=_PRUNE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_and_data_flags(prune)
    prune.add_argument("--preset", choices=PRESETS, default="default",
                       help="starting settings: light (25%% heads, refit), default (50%% heads, refit + "
                            "150 distillation steps), aggressive (50%% heads + 25%% FFN); default: default")
    prune.add_argument("--config", type=Path, metavar="FILE.yaml",
                       help="YAML with sections data/importance/budget/recovery; overrides the preset")
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
    prune.set_defaults(func=run_prune)


def build_prune_config(args: argparse.Namespace) -> PruneConfig:
    """Preset, then ``--config``, then flags (see the module docstring)."""
    config = preset(args.preset)
    if args.config is not None:
        config = PruneConfig.from_dict(read_yaml(args.config), base=config)
    config = PruneConfig.from_dict(flag_overrides(args), base=config)
    if args.no_recovery:
        config = PruneConfig(config.data, config.importance, config.budget, no_recovery())
    return config


def _fail(exc: OptimizerError) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return EXIT_USER_ERROR


def run_score(args: argparse.Namespace) -> int:
    """Handler of ``pruneserve score``."""
    try:
        overrides = flag_overrides(args)
        config = PruneConfig.from_dict({k: v for k, v in overrides.items() if k in ("data", "importance")})
        from pruneserve.optimizer.adapters import load_model
        from pruneserve.optimizer.pruner import score_model

        started = time.perf_counter()
        loaded = load_model(args.model)
        importance, split = score_model(loaded, config.data, config.importance, progress=not args.no_progress)
    except OptimizerError as exc:
        return _fail(exc)
    from pruneserve.optimizer import plots

    args.out.mkdir(parents=True, exist_ok=True)
    document = {
        "model": loaded.name,
        "model_sha256": loaded.source_sha256,
        "data": split.source,
        **importance.to_dict(),
    }
    (args.out / "importance.json").write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    plots.importance_heatmap(importance, args.out / "importance.png", title=loaded.name)
    heads = importance.heads
    print(f"scored {heads.shape[0]} layers x {heads.shape[1]} heads and {importance.ffn.shape[1]} FFN neurons "
          f"per layer on {importance.examples} examples in {time.perf_counter() - started:.1f} s")
    print(f"wrote {args.out / 'importance.json'} and {args.out / 'importance.png'}")
    return 0


def run_prune(args: argparse.Namespace) -> int:
    """Handler of ``pruneserve prune``."""
    try:
        config = build_prune_config(args)
        from pruneserve.optimizer.adapters import load_model
        from pruneserve.optimizer.pruner import run_pruning

        started = time.perf_counter()
        loaded = load_model(args.model)
        result = run_pruning(loaded, config, progress=not args.no_progress)
    except OptimizerError as exc:
        return _fail(exc)
    from pruneserve.optimizer import plots
    from pruneserve.optimizer.checkpoint import save_pruned

    record = {"source_model": loaded.name, "source_sha256": loaded.source_sha256, **result.record()}
    record["timings_s"]["total"] = round(time.perf_counter() - started, 2)
    try:
        save_pruned(result.encoder, args.out, plan=result.plan, record=record, tokenizer=loaded.tokenizer)
    except OptimizerError as exc:
        return _fail(exc)
    head_mask, _ = result.plan.to_masks(loaded.encoder.spec)
    plots.importance_heatmap(result.importance, args.out / "importance.png", head_mask=head_mask, title=loaded.name)
    plots.tradeoff_curve(result.trace, args.out / "tradeoff.png", floor=config.budget.quality_floor)
    print(f"kept heads per layer {record['heads_per_layer']}, FFN per layer {record['ffn_per_layer']}")
    for stage in result.recovery:
        print(f"  {stage.method:<16} {stage.quality.describe()}  ({stage.seconds:.0f} s)")
    print(f"params {result.params_before:,} -> {result.params_after:,}; FLOPs at {result.flops_seq_len} tokens "
          f"{result.flops_before / 1e9:.2f} G -> {result.flops_after / 1e9:.2f} G")
    print(f"quality measured on {result.eval_examples} held-out examples from {result.data_source}")
    print(f"wrote {args.out} in {record['timings_s']['total']:.0f} s")
    return 0
