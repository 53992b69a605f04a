"""``pruneserve optimize``: prune, recover, export, fuse, quantize, validate, write an artifact.

Flags map one-to-one onto :class:`~pruneserve.optimizer.pipeline.OptimizeConfig` fields and
are applied in this order, each overriding the one before field by field: ``--preset`` (the
base; ``--from-pruned``: the checkpoint's recorded pruning settings instead), then
``--config optimize.yaml`` (the same format the artifact's ``optimize.yaml`` is written in, so
a past run can be repeated), then the flags. The artifact records the resolved result with
absolute paths. torch is imported only inside the handler. A user error prints one
``error:`` line, writes nothing at ``--out`` and exits 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pruneserve.optimizer.cli_args import (
    EXIT_USER_ERROR,
    add_importance_flags,
    add_model_and_data_flags,
    config_flags,
    error_line,
    flag_overrides,
    merge_section,
    prune_config_fields,
    read_yaml,
    show_progress,
)
from pruneserve.optimizer.config import PRESETS
from pruneserve.optimizer.errors import ConfigError, OptimizerError

from pruneserve.artifact import ArtifactError

_HELP = """\
Make a model cheap to serve and write a verified artifact for `pruneserve serve`:
score and prune attention heads / FFN neurons, recover quality (least-squares refit,
distillation), export to ONNX, fuse with ONNX Runtime's transformer optimizer, quantize
for the target, validate against the original model, and write model.onnx, tokenizer.json,
manifest.json (sha256 of every file), report.md with figures, optimize.yaml and pruning.json.

Defaults: the bundled all-MiniLM-L6-v2, the bundled English corpus, the "default" preset
(50% of heads, refit + distillation), --quantize auto, and a quality floor of 0.95 mean
cosine to the original model.

--quantize auto on --target cpu builds dynamic INT8 (fused graph), calibrated static INT8
(NNCF or ONNX Runtime, batch-invariant) and fp32, measures each one's held-out quality,
batch invariance and latency on every engine installed here (ONNX Runtime, OpenVINO f32/bf16),
and keeps the fastest (quantization, engine) pair that meets the quality floor and answers a
text the same alone or batched (--allow-batch-variance lets dynamic INT8 compete). The
manifest records every candidate's numbers and why it was or was not chosen, and the engine
`pruneserve serve --engine auto` will use. GPU targets cannot be measured here and keep fixed
modes: tensorrt -> static S8S8 QDQ calibrated on --data, cuda -> fp16 with normalisations
and Softmax kept in fp32. An explicit --quantize dynamic|static|none forces that mode.

Quality holds on text like the calibration data: pass --data with a sample of your traffic.

Settings: the preset is the base, --config FILE.yaml overrides it field by field, and flags
override both. Relative paths in the YAML file (model, out, from_pruned, prune.data.path) are
relative to the YAML file's folder; paths given as flags are relative to the current folder.
The artifact's optimize.yaml and manifest record the resolved settings, paths made absolute.

Starting from `pruneserve prune`'s output: --from-pruned DIR skips scoring, search, pruning and
recovery, uses DIR's checkpoint as the pruned model and the original model (the source DIR's
pruning.json records, or --model; its sha256 must match) as the reference, and carries DIR's
pruning record (kept heads, quality before/after recovery) into the artifact.

examples:
  pruneserve optimize --out artifacts/minilm
  pruneserve optimize --model ./my-model --data traffic.jsonl --quality-floor 0.97 --out artifacts/mine
  pruneserve optimize --preset light --quantize none --with-reference --out artifacts/light
  pruneserve optimize --config artifacts/minilm/optimize.yaml --out artifacts/again
  pruneserve prune --out pruned/ && pruneserve optimize --from-pruned pruned/ --out artifacts/from-pruned
"""

#: ``{config key: dest}`` of the flags outside the prune sections, for naming them in errors.
_TOP_LEVEL_FIELDS: dict[str, str] = {
    "model": "model", "out": "out", "from_pruned": "from_pruned", "name": "name", "preset": "preset",
    "target": "target", "quality_floor": "quality_floor", "quantize.mode": "quantize",
    "quantize.calibration_size": "calibration_size", "quantize.static_method": "int8_method",
    "export.opset": "opset",
}
#: Paths an optimize.yaml may hold; relative ones are relative to the YAML file's folder.
_YAML_PATHS: tuple[tuple[str, ...], ...] = (("model",), ("out",), ("from_pruned",), ("prune", "data", "path"))


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``optimize`` to the top-level parser."""
    parser = subparsers.add_parser(
        "optimize", help="prune, fuse, quantize and validate a model into a servable artifact",
        description=_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_and_data_flags(parser)
    parser.add_argument("--preset", choices=PRESETS,
                        help="pruning starting point: light (25%% heads), default (50%% heads, refit + "
                             "distillation), aggressive (50%% heads + 25%% FFN); default: default")
    parser.add_argument("--config", type=Path, metavar="FILE.yaml",
                        help="an optimize.yaml (e.g. from a previous artifact): overrides the preset field by "
                             "field; flags override it; its relative paths are relative to its folder")
    parser.add_argument("--from-pruned", type=Path, dest="from_pruned", metavar="DIR",
                        help="start from `pruneserve prune`'s output DIR: skip score/search/prune/recovery; "
                             "--model (default: the source DIR records) must be the model DIR was pruned from")
    budget = parser.add_argument_group("budget (what to remove)")
    budget.add_argument("--heads", type=float, dest="head_fraction", metavar="F",
                        help="fraction of all attention heads to remove, e.g. 0.5")
    budget.add_argument("--ffn", type=float, dest="ffn_fraction", metavar="F",
                        help="fraction of all FFN neurons to remove, e.g. 0.25")
    budget.add_argument("--quality-floor", type=float, dest="quality_floor", metavar="Q",
                        help="remove as much compute as keeps quality >= Q on held-out data, and hold the "
                             "final artifact to Q (default floor for the artifact: 0.95)")
    add_importance_flags(parser)
    stages = parser.add_argument_group("export, quantization and validation")
    stages.add_argument("--quantize", choices=("auto", "dynamic", "static", "fp16", "none"),
                        help="auto (default): on cpu, the fastest measured of dynamic/static/none that meets "
                             "the floor (and batch invariance); tensorrt static, cuda fp16")
    stages.add_argument("--allow-batch-variance", action="store_true", default=None, dest="allow_batch_variance",
                        help="let auto choose a graph whose answers move slightly with their batch-mates "
                             "(dynamic INT8); default: batch-invariant answers only")
    stages.add_argument("--target", choices=("cpu", "cuda", "tensorrt"),
                        help="where the artifact will run (default: cpu)")
    stages.add_argument("--calibration-size", type=int, dest="calibration_size", metavar="N",
                        help="texts used to calibrate static INT8 (default 256)")
    stages.add_argument("--int8-method", choices=("auto", "nncf", "ort"), dest="int8_method",
                        help="how static INT8 is calibrated: nncf (NNCF, needs the openvino extra), ort "
                             "(ONNX Runtime's static quantizer), auto (default): nncf when installed, else ort")
    stages.add_argument("--opset", type=int, help="ONNX opset (default 17)")
    stages.add_argument("--no-baselines", action="store_false", dest="baselines", default=None,
                        help="skip timing the original model (faster; the report then shows no speed-up)")
    parser.add_argument("--name", help="model name in the artifact (default: from the model folder)")
    parser.add_argument("--with-reference", action="store_true", default=None, dest="with_reference",
                        help="also ship the unpruned fp32 graph as reference.onnx (for shadow comparison)")
    parser.add_argument("--overwrite", action="store_true", default=None, help="replace an existing --out")
    parser.add_argument("--out", required=True, type=Path, help="artifact directory to create")
    parser.set_defaults(func=run_optimize_command,
                        config_flags=config_flags(parser, {**prune_config_fields(), **_TOP_LEVEL_FIELDS}))


def _top_level_flags(args: argparse.Namespace) -> dict[str, Any]:
    """``OptimizeConfig`` overrides from the flags the user gave (``None`` = not given)."""
    raw: dict[str, Any] = {"out": str(args.out)}
    for key in ("model", "from_pruned", "name", "preset", "target", "with_reference", "overwrite",
                "allow_batch_variance"):
        value = getattr(args, key, None)
        if value is not None:
            raw[key] = str(value) if key in ("model", "from_pruned") else value
    if args.quality_floor is not None:
        raw["quality_floor"] = args.quality_floor
    if args.pooling is not None:
        raw["pooling"] = args.pooling
    if args.normalize_embeddings is not None:
        raw["normalize"] = args.normalize_embeddings
    sections = {
        "quantize": {"mode": args.quantize, "calibration_size": args.calibration_size,
                     "static_method": args.int8_method},
        "export": {"opset": args.opset},
        "validate": {"baselines": args.baselines},
    }
    for name, values in sections.items():
        given = {k: v for k, v in values.items() if v is not None}
        if given:
            raw[name] = given
    return raw


def _pruned_base(args: argparse.Namespace, from_pruned: str) -> dict[str, Any]:
    """With ``--from-pruned``: the checkpoint's recorded pruning settings, the base the YAML and the
    data flags override (the data split then matches the one recovery held out). Flags that shape
    the pruning are refused: the checkpoint is already pruned."""
    from pruneserve.optimizer.checkpoint import read_pruning_document

    shaping = [flag for key, (dest, flag) in args.config_flags.items()
               if key.split(".")[0] in ("importance", "budget", "recovery") and getattr(args, dest, None) is not None]
    if args.preset is not None:
        shaping.insert(0, "--preset")
    if shaping:
        raise ConfigError(
            f"{', '.join(dict.fromkeys(shaping))} cannot change --from-pruned {from_pruned}: it is already pruned "
            "and recovered; drop them, or run optimize from the original model without --from-pruned"
        )
    recorded = read_pruning_document(from_pruned).get("record", {}).get("config")
    return dict(recorded) if isinstance(recorded, dict) else {}


def build_optimize_config(args: argparse.Namespace) -> Any:
    """Preset (or ``--from-pruned``'s recorded settings), then ``--config``, then flags, each field by
    field; returns a validated ``OptimizeConfig`` (see the module docstring)."""
    from pruneserve.optimizer.pipeline import OptimizeConfig

    raw: dict[str, Any] = read_yaml(args.config, _YAML_PATHS) if args.config is not None else {}
    flags = _top_level_flags(args)
    from_pruned = flags.get("from_pruned") or raw.get("from_pruned")
    prune: dict[str, Any] = {}
    if from_pruned:
        prune = _pruned_base(args, str(from_pruned))
        flags.pop("preset", None)
    yaml_prune = raw.get("prune")
    if yaml_prune is not None and not isinstance(yaml_prune, dict):
        raise ConfigError(f"--config {args.config}: section 'prune' must be a mapping, got {type(yaml_prune).__name__}")
    for section, values in (yaml_prune or {}).items():
        prune[section] = merge_section(prune.get(section), values, f"--config {args.config}: section prune.{section}")
    for section, values in flag_overrides(args).items():
        prune[section] = merge_section(prune.get(section), values, f"--config {args.config}: section prune.{section}")
    for name in ("quantize", "export", "validate"):
        if name in flags:
            flags[name] = merge_section(raw.get(name), flags[name], f"--config {args.config}: section {name}")
    merged = {**raw, **flags}
    if prune:
        merged["prune"] = prune
    return OptimizeConfig.from_dict(merged)


def run_optimize_command(args: argparse.Namespace) -> int:
    """Handler of ``pruneserve optimize``."""
    try:
        config = build_optimize_config(args)
        from pruneserve.optimizer.pipeline import run_optimize
        from pruneserve.optimizer.report import summary_lines

        result = run_optimize(config, progress=show_progress(args))
    except (OptimizerError, ArtifactError) as exc:
        print(error_line(exc, args), file=sys.stderr)
        return EXIT_USER_ERROR
    for line in summary_lines(result.artifact.manifest):
        print(line)
    print(f"wrote {result.artifact.path} in {result.seconds:.0f} s (see report.md)")
    return 0
