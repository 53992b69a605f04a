"""``python -m benchmarks --quick|--full [--only model,server,shadow,optimizer,scaling] [--out DIR]``.

Runs the selected benchmarks in order (model, server, shadow, optimizer, scaling), writes CSV/JSON/PNG
under ``--out`` and refreshes the matching sections of BENCHMARKS.md. One benchmark failing
(a peer that cannot be installed, a server that does not start) is reported in its section's
notes and does not stop the others; the exit code is 1 if any failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from benchmarks._common import (
    BENCHMARKS,
    DEFAULT_RESULTS,
    PROTOCOLS,
    REPO_ROOT,
    BenchConfig,
    BenchmarkError,
    machine_info,
)
from pruneserve.outputs import mark_output_dir

logger = logging.getLogger("benchmarks")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--quick", action="store_const", const="quick", dest="mode", help="few repetitions (minutes)")
    mode.add_argument("--full", action="store_const", const="full", dest="mode", help="stable medians (~40 min on 2 cores)")
    p.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated benchmarks to run")
    p.add_argument("--out", type=Path, default=DEFAULT_RESULTS, help="results folder (default benchmarks/results)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="ONNX Runtime / torch threads")
    p.add_argument("--model-dir", type=Path, default=None, help="original model folder (default: the default model)")
    p.add_argument(
        "--artifact", action="append", default=[], metavar="LABEL=DIR",
        help="benchmark this prebuilt artifact instead of building the presets (repeatable)",
    )  # fmt: skip
    p.add_argument(
        "--protocols", default=",".join(PROTOCOLS),
        help=f"comma-separated protocols the server benchmark drives each server over (default {','.join(PROTOCOLS)})",
    )  # fmt: skip
    p.add_argument("--markdown", type=Path, default=REPO_ROOT / "BENCHMARKS.md", help="report to refresh")
    p.add_argument("--no-markdown", action="store_true", help="write results only, leave BENCHMARKS.md alone")
    return p.parse_args(argv)


def _artifacts(specs: list[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep or not label or not (Path(path) / "manifest.json").is_file():
            raise BenchmarkError(f"--artifact {spec!r}: expected LABEL=DIR with DIR/manifest.json present")
        out[label] = Path(path)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the harness; returns 0 when every selected benchmark produced results."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("benchmarks").setLevel(logging.INFO)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    command = "python -m benchmarks " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    try:
        cfg = BenchConfig(
            mode=args.mode,
            out_dir=args.out,
            only=tuple(s.strip() for s in args.only.split(",") if s.strip()),
            threads=args.threads,
            model_dir=args.model_dir,
            artifacts=_artifacts(args.artifact),
            command=command,
            protocols=tuple(s.strip() for s in args.protocols.split(",") if s.strip()),
        )
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run(cfg, None if args.no_markdown else args.markdown)


def run(cfg: BenchConfig, markdown: Path | None) -> int:
    """Run every benchmark in ``cfg.only``; write results and (unless None) the markdown sections."""
    from benchmarks import tables

    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    mark_output_dir(cfg.out_dir, "results")  # so a later run (or --overwrite) knows the harness made it
    info = machine_info(cfg.command)
    # The machine section (and machine.json) describe the run that every table comes from. A
    # partial run leaves them alone and stamps the sections it rewrites with its own command.
    partial = set(cfg.only) != set(BENCHMARKS)
    sections: dict[str, str] = {}
    if not partial:
        (cfg.out_dir / "machine.json").write_text(json.dumps(info, indent=2) + "\n")
        sections["machine"] = tables.machine_section(info)
    failed: list[str] = []
    artifacts: dict[str, Path] | None = None
    artifact_notes: list[str] = []

    def get_artifacts() -> dict[str, Path]:
        nonlocal artifacts
        if artifacts is None:
            from benchmarks.model import build_artifacts

            artifacts, notes = build_artifacts(cfg)
            artifact_notes.extend(notes)
            for n in notes:
                logger.warning("%s", n)
        return artifacts

    if "model" in cfg.only:
        sections["pruning"] = _guard("pruning", failed, lambda: tables.pruning_section(get_artifacts()))
        sections["model"] = _guard("model", failed, lambda: _model(cfg, get_artifacts(), artifact_notes))
    if "server" in cfg.only:
        sections["server"] = _guard("server", failed, lambda: _server(cfg, get_artifacts()))
    if "shadow" in cfg.only:
        sections["shadow"] = _guard("shadow", failed, lambda: _shadow(cfg, get_artifacts()))
    if "optimizer" in cfg.only:
        sections["optimizer"] = _guard("optimizer", failed, lambda: _optimizer(cfg))
    if "scaling" in cfg.only:
        sections["scaling"] = _guard("scaling", failed, lambda: _scaling(cfg, get_artifacts(), markdown))
    if markdown is not None:
        if partial:
            flags = ", ".join(info.get("cpu_flags") or []) or "unknown flags"
            stamp = (
                f"_Measured in a separate run: `{cfg.command}`, {info.get('date')}, on {info.get('cpu')}, "
                f"{info.get('cores')} cores ({flags})._\n\n"
            )
            sections = {name: stamp + body for name, body in sections.items()}
        tables.update_markdown(markdown, sections, info["cpu_class"], info["cpu_class_title"])
        logger.info("updated %s", markdown)
    logger.info("results in %s", cfg.out_dir)
    if failed:
        logger.error("failed: %s", ", ".join(failed))
        return 1
    return 0


def _guard(name: str, failed: list[str], fn: Any) -> str:
    try:
        return str(fn())
    except Exception as exc:  # noqa: BLE001 - one benchmark's failure must not lose the others' results
        logger.exception("%s benchmark failed", name)
        failed.append(name)
        return f"_Not measured in the last run: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}_"


def _model(cfg: BenchConfig, artifacts: dict[str, Path], artifact_notes: list[str]) -> str:
    from benchmarks import tables
    from benchmarks.model import run_model_bench

    res = run_model_bench(cfg, artifacts=artifacts)
    ceilings = res.ceilings.to_dict() if res.ceilings else None
    return tables.model_section(res.rows, ceilings, [*artifact_notes, *res.notes])


def _server(cfg: BenchConfig, artifacts: dict[str, Path]) -> str:
    from benchmarks import tables
    from benchmarks.server import run_server_bench

    rows, notes = run_server_bench(cfg, artifacts)
    return tables.server_section(rows, notes)


def _shadow(cfg: BenchConfig, artifacts: dict[str, Path]) -> str:
    from benchmarks.shadow import run_shadow_bench, shadow_section

    rows, notes = run_shadow_bench(cfg, artifacts)
    return shadow_section(rows, notes)


def _optimizer(cfg: BenchConfig) -> str:
    from benchmarks import tables
    from benchmarks.optimizer_bench import run_optimizer_bench

    rows, notes = run_optimizer_bench(cfg)
    return tables.optimizer_section(rows, notes)


def _scaling(cfg: BenchConfig, artifacts: dict[str, Path], markdown: Path | None) -> str:
    from benchmarks import tables
    from benchmarks.scaling import run_scaling_bench

    rows, notes = run_scaling_bench(cfg, artifacts)
    png = cfg.out_dir / "scaling.png"
    rel = os.path.relpath(png, markdown.parent) if markdown is not None else str(png)
    return tables.scaling_section(rows, rel, notes)


if __name__ == "__main__":
    sys.exit(main())
