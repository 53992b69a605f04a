"""Typed, validated configuration for scoring, searching, pruning and recovery.

Every dataclass checks itself in ``__post_init__`` and raises
:class:`~pruneserve.optimizer.errors.ConfigError` with a message naming the value, the
allowed range and the fix, so a bad YAML file or CLI flag fails before any model is loaded.
Configs round-trip through plain dicts (``to_dict`` / ``from_dict``) so they can be written
into ``pruning.json`` and the artifact manifest, and read back from ``--config file.yaml``.

The defaults follow what was measured on all-MiniLM-L6-v2 before this code was written (the
figures they give are in BENCHMARKS.md, "Pruning and recovery"): global ranking of raw Michel scores, a
protected last layer, ridge refit with alpha = 0.1 x mean Gram diagonal, AdamW at 1.5e-4 decayed
to 0 on a cosine schedule.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_args

from pruneserve.optimizer.errors import ConfigError

ImportanceMethod = Literal["michel", "fisher"]
Normalization = Literal["global", "layer"]
ImportanceLoss = Literal["auto", "cross_entropy", "contrastive"]
CostModel = Literal["flops", "count"]
LrSchedule = Literal["constant", "cosine"]
PresetName = Literal["light", "default", "aggressive"]

PRESETS: tuple[str, ...] = get_args(PresetName)


def absolute_path(value: str | os.PathLike[str], base: str | os.PathLike[str] | None = None, *, key: str = "path") -> str:
    """``value`` as an absolute, normalised path; a relative one is taken relative to ``base``
    (default: the current directory). Symlinks are kept as the user named them.

    Every path a config records is absolute, so a saved ``optimize.yaml`` or ``pruning.json``
    means the same from any folder.
    """
    if not isinstance(value, (str, os.PathLike)) or isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} is not a path; give a file or folder name", key=key)
    path = os.path.expanduser(os.fspath(value))
    if not path:
        raise ConfigError(f"{key} is empty; give a file or folder name", key=key)
    if not os.path.isabs(path):
        path = os.path.join(os.fspath(base) if base is not None else os.getcwd(), path)
    return os.path.normpath(path)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}; pick one of them",
                          key=name)


def _check_range(
    name: str,
    value: float,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
    fix: str = "",
) -> None:
    # bool is an int subclass; a YAML `true` where a number belongs is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(float(value)):
        raise ConfigError(f"{name}={value!r} is not a number; give a number in the stated range", key=name)
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ConfigError(f"{name}={value!r} is outside {lo}{low}, {high}{hi}{'; ' + fix if fix else ''}", key=name)


def _check_int(name: str, value: int, low: int, fix: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name}={value!r} is not an integer; give a whole number >= {low}", key=name)
    if value < low:
        raise ConfigError(f"{name}={value} is below the minimum {low}{'; ' + fix if fix else ''}", key=name)


@dataclass
class DataConfig:
    """Where the calibration texts come from and how they are split and batched.

    ``path=None`` uses the bundled English corpus (sentences from the Python documentation).
    ``eval_fraction`` of the deduplicated examples is held out for measuring quality; the rest
    is used for scoring and recovery. ``max_examples`` caps the total (after deduplication).
    """

    path: str | None = None
    eval_fraction: float = 0.25
    seed: int = 0
    max_length: int = 128
    batch_size: int = 32
    max_examples: int | None = 2000

    def __post_init__(self) -> None:
        if self.path is not None:
            self.path = absolute_path(self.path, key="data.path")
        _check_range(
            "data.eval_fraction", self.eval_fraction, 0.0, 1.0, low_open=True, high_open=True,
            fix="hold out e.g. 0.25 of the data for evaluation",
        )
        _check_int("data.seed", self.seed, 0)
        _check_int("data.max_length", self.max_length, 8, fix="sequences need room for special tokens")
        _check_int("data.batch_size", self.batch_size, 2, fix="the contrastive loss needs >= 2 texts per batch")
        if self.max_examples is not None:
            _check_int("data.max_examples", self.max_examples, 2, fix="keep at least one scoring and one eval text")


@dataclass
class ImportanceConfig:
    """How heads and FFN neurons are scored (Michel et al., 2019, "Are Sixteen Heads Really
    Better than One?").

    ``method``: ``michel`` sums |dL/dgate| over batches, ``fisher`` sums (dL/dgate)^2.
    ``normalize``: ``global`` keeps raw scores (one ranking across layers; measured ~0.05
    better here) and ``layer`` divides each layer's scores by their L2 norm (bertology default).
    ``loss``: ``auto`` = cross-entropy for classifiers, in-batch contrastive loss against the
    original model for embedding models. ``temperature`` is the contrastive softmax
    temperature (0.05 ranked best when measured; see :mod:`pruneserve.optimizer.importance`).
    ``max_examples`` caps the texts per scoring pass (the search re-scores after every step,
    so this bounds its cost; ``None`` = the whole scoring split).
    """

    method: ImportanceMethod = "michel"
    normalize: Normalization = "global"
    loss: ImportanceLoss = "auto"
    temperature: float = 0.05
    max_examples: int | None = 512

    def __post_init__(self) -> None:
        _check_choice("importance.method", self.method, get_args(ImportanceMethod))
        _check_choice("importance.normalize", self.normalize, get_args(Normalization))
        _check_choice("importance.loss", self.loss, get_args(ImportanceLoss))
        _check_range(
            "importance.temperature", self.temperature, 0.0, 10.0, low_open=True,
            fix="use a temperature such as 0.05",
        )
        if self.max_examples is not None:
            _check_int("importance.max_examples", self.max_examples, 2, fix="score on at least a few hundred texts")


@dataclass
class BudgetConfig:
    """How much to remove.

    Either fixed fractions (``head_fraction`` of all attention heads, ``ffn_fraction`` of all
    FFN neurons), or a ``quality_floor``: remove as much compute as possible while quality on
    the evaluation split stays at or above it. Quality is the mean cosine similarity to the
    original model's embeddings for embedding models and ``1 - accuracy drop`` for classifiers.
    With a floor, non-zero fractions are upper limits (zero means "no limit" for both).

    The search removes ``step_fraction`` at a time and re-scores after every step. ``cost``
    ranks units by importance per FLOP (``flops``) or per unit (``count``); it matters when the
    search trades heads against FFN neurons (quality-floor mode). ``protected_layers`` never lose
    all their heads or neurons (emptying the last layer was measured catastrophic: 0.70 cosine);
    ``min_heads_per_layer`` applies to every layer.
    """

    head_fraction: float = 0.0
    ffn_fraction: float = 0.0
    quality_floor: float | None = None
    step_fraction: float = 0.1
    cost: CostModel = "flops"
    cost_seq_len: int = 128
    protected_layers: tuple[int, ...] = (-1,)
    min_heads_per_layer: int = 0

    def __post_init__(self) -> None:
        _check_range("budget.head_fraction", self.head_fraction, 0.0, 1.0, fix="e.g. 0.5 removes half the heads")
        _check_range("budget.ffn_fraction", self.ffn_fraction, 0.0, 1.0, fix="e.g. 0.25 removes a quarter of the FFN")
        if self.quality_floor is not None:
            _check_range(
                "budget.quality_floor", self.quality_floor, 0.0, 1.0, low_open=True, high_open=True,
                fix="e.g. 0.95 keeps mean cosine fidelity >= 0.95",
            )
        elif self.head_fraction == 0.0 and self.ffn_fraction == 0.0:
            raise ConfigError(
                "budget removes nothing: head_fraction=0 and ffn_fraction=0 with no quality_floor; "
                "set --heads, --ffn or --quality-floor"
            )
        _check_range("budget.step_fraction", self.step_fraction, 0.0, 1.0, low_open=True, fix="e.g. 0.1")
        _check_choice("budget.cost", self.cost, get_args(CostModel))
        _check_int("budget.cost_seq_len", self.cost_seq_len, 1)
        self.protected_layers = tuple(self.protected_layers)
        for layer in self.protected_layers:
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise ConfigError(f"budget.protected_layers entry {layer!r} is not a layer index; use e.g. [-1]",
                                  key="budget.protected_layers")
        _check_int("budget.min_heads_per_layer", self.min_heads_per_layer, 0)

    @property
    def uses_floor(self) -> bool:
        """True when the search stops at a quality floor rather than at fixed fractions."""
        return self.quality_floor is not None


@dataclass
class RecoveryConfig:
    """How quality is recovered after physical pruning.

    ``least_squares`` refits each attention output projection layer by layer (ridge toward the
    original weights, alpha = ``ridge_alpha_scale`` x mean Gram diagonal; alpha 1e-3 was
    measured to overfit), ``refit_ffn`` does the same for each FFN output projection. Then
    ``distill_steps`` AdamW steps (or ``distill_epochs`` passes over the scoring split, which
    takes precedence when set) of distillation to the original model at learning rate ``lr``,
    decayed to 0 over the steps when ``lr_schedule="cosine"`` (the default).
    ``distill_hidden_weight`` weighs a token-level term (``1 - cosine`` between the student's and
    the teacher's last hidden state, every real token) added to the pooled-output loss; 0 turns
    it off. Measured on all-MiniLM-L6-v2 (50% heads, 100 steps after refit, held-out mean
    cosine): pooled only .9643, + token term .9652, + every layer's tokens .9656 at twice the
    cost per step. The schedule, on the default preset's plan (300 steps after the refit):
    constant 1e-4 .9681, cosine from 1.5e-4 .9706, from 2e-4 .9703, from 3e-4 .9691.
    """

    least_squares: bool = True
    refit_ffn: bool = True
    ridge_alpha_scale: float = 0.1
    distill_steps: int = 0
    distill_epochs: float | None = None
    lr: float = 1.5e-4
    weight_decay: float = 0.01
    distill_temperature: float = 1.0
    distill_hidden_weight: float = 1.0
    lr_schedule: LrSchedule = "cosine"

    def __post_init__(self) -> None:
        for name in ("least_squares", "refit_ffn"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"recovery.{name}={getattr(self, name)!r} is not true/false", key=f"recovery.{name}")
        _check_range(
            "recovery.ridge_alpha_scale", self.ridge_alpha_scale, 0.0, 100.0, low_open=True,
            fix="0.1 was measured to generalise; 1e-3 overfits",
        )
        _check_int("recovery.distill_steps", self.distill_steps, 0)
        if self.distill_epochs is not None:
            _check_range("recovery.distill_epochs", self.distill_epochs, 0.0, 1000.0, low_open=True, fix="e.g. 2")
        _check_range("recovery.lr", self.lr, 0.0, 1.0, low_open=True, fix="e.g. 1.5e-4")
        _check_range("recovery.weight_decay", self.weight_decay, 0.0, 1.0)
        _check_range("recovery.distill_temperature", self.distill_temperature, 0.0, 100.0, low_open=True)
        _check_range("recovery.distill_hidden_weight", self.distill_hidden_weight, 0.0, 100.0,
                     fix="0 distils the pooled output only; 1 adds an equal token-level term")
        _check_choice("recovery.lr_schedule", self.lr_schedule, get_args(LrSchedule))

    @property
    def distills(self) -> bool:
        """True when any distillation step will run."""
        return self.distill_steps > 0 or self.distill_epochs is not None


def no_recovery() -> RecoveryConfig:
    """A recovery config that changes nothing (``--no-recovery``)."""
    return RecoveryConfig(least_squares=False, refit_ffn=False, distill_steps=0, distill_epochs=None)


@dataclass
class PruneConfig:
    """Everything ``pruneserve prune`` (and the pruning stage of ``optimize``) needs."""

    data: DataConfig = field(default_factory=DataConfig)
    importance: ImportanceConfig = field(default_factory=ImportanceConfig)
    budget: BudgetConfig = field(default_factory=lambda: BudgetConfig(head_fraction=0.5))
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)

    def __post_init__(self) -> None:
        for name, kind in _SECTIONS.items():
            if not isinstance(getattr(self, name), kind):
                raise ConfigError(f"prune config section {name!r} is a {type(getattr(self, name)).__name__}, not a mapping")

    def to_dict(self) -> dict[str, Any]:
        """A JSON/YAML-safe dict (tuples become lists)."""
        return {name: _section_to_dict(getattr(self, name)) for name in _SECTIONS}

    @classmethod
    def from_dict(cls, raw: dict[str, Any], base: PruneConfig | None = None) -> PruneConfig:
        """Build a config from a (YAML) dict, overriding ``base`` (defaults when ``None``).

        Unknown sections or keys raise :class:`ConfigError` naming the key and the known ones, so
        a typo is not silently ignored.
        """
        if not isinstance(raw, dict):
            raise ConfigError(f"prune config must be a mapping of sections, got {type(raw).__name__}")
        base = base or cls()
        sections: dict[str, Any] = {}
        for name in _SECTIONS:
            sections[name] = getattr(base, name)
        for name, values in raw.items():
            if name not in _SECTIONS:
                raise ConfigError(f"unknown prune config section {name!r}; known sections: {', '.join(_SECTIONS)}")
            if not isinstance(values, dict):
                raise ConfigError(f"prune config section {name!r} must be a mapping, got {type(values).__name__}")
            sections[name] = _replace(sections[name], values, name)
        return cls(**sections)


_SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "importance": ImportanceConfig,
    "budget": BudgetConfig,
    "recovery": RecoveryConfig,
}

_Section = TypeVar("_Section")


def _section_to_dict(section: object) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(section).items()}  # type: ignore[call-overload]


def _replace(section: _Section, values: dict[str, Any], name: str) -> _Section:
    known = {f.name for f in dataclasses.fields(section)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)} in section {name!r}; known keys: {', '.join(sorted(known))}")
    if "protected_layers" in values and values["protected_layers"] is not None:
        values = {**values, "protected_layers": tuple(values["protected_layers"])}
    return dataclasses.replace(section, **values)  # type: ignore[type-var]


def preset(name: str) -> PruneConfig:
    """The named starting point; CLI flags and ``--config`` override its fields.

    * ``light``: 25% of heads, attention refit only. Seconds of recovery, small quality loss.
    * ``default``: 50% of heads, one attention + FFN refit sweep, 300 distillation steps (pooled
      + token-level, cosine-decayed rate). On all-MiniLM-L6-v2 with the bundled corpus: 0.97 mean cosine on
      held-out text, about 4 minutes on a 2-core machine (see benchmarks/results/prune_minilm.md).
    * ``aggressive``: 50% of heads and 25% of FFN neurons, refit + 300 distillation steps.
    """
    _check_choice("preset", name, PRESETS)
    if name == "light":
        return PruneConfig(
            budget=BudgetConfig(head_fraction=0.25),
            recovery=RecoveryConfig(least_squares=True, refit_ffn=False, distill_steps=0),
        )
    if name == "default":
        return PruneConfig(
            budget=BudgetConfig(head_fraction=0.5),
            # 300 steps, cosine-decayed from 1.5e-4: .9706 held-out in 258 s (load ~1.5; see the results file).
            recovery=RecoveryConfig(least_squares=True, refit_ffn=True, distill_steps=300),
        )
    return PruneConfig(
        budget=BudgetConfig(head_fraction=0.5, ffn_fraction=0.25),
        recovery=RecoveryConfig(least_squares=True, refit_ffn=True, distill_steps=300),
    )
