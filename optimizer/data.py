"""Calibration data: reading ``--data FILE``, the bundled default corpus, splitting and batching.

Accepted files:

* JSON Lines (``.jsonl`` / ``.json``, or any file whose first non-blank line is a JSON
  object): one object per line with ``text``, optional ``text_pair`` and optional ``label``
  (a label name from the model's config, or its integer index). Either every line has a label
  or none does.
* Plain text (anything else): one example per non-blank line.

Examples are deduplicated (whitespace-normalised text and pair) *before* a seeded shuffle
splits them into a scoring part and a disjoint evaluation part, so the same sentence can never
be scored on and then used to measure quality.

The default corpus (``optimizer/data/pydoc_sentences.txt``) holds ~2,000 English sentences
extracted from the Python standard library's documentation topics
(``pydoc_data.topics.topics``), so the default model can be pruned offline. It is generated,
deterministically, by ``python -m pruneserve.optimizer.data > optimizer/data/pydoc_sentences.txt``
(see :func:`build_default_corpus`); the file is shipped so the corpus does not change with the
Python version.
"""

from __future__ import annotations

import json
import logging
import random
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pruneserve.optimizer.config import DataConfig
from pruneserve.optimizer.errors import DataError

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer

logger = logging.getLogger(__name__)

DEFAULT_CORPUS = "pydoc_sentences.txt"
DEFAULT_SOURCE = "bundled corpus: sentences from the Python documentation (pydoc_data.topics)"
_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
_KNOWN_KEYS = frozenset({"text", "text_pair", "label"})


@dataclass(frozen=True)
class Example:
    """One calibration example; ``line`` is its 1-based line in the source file (for errors)."""

    text: str
    text_pair: str | None = None
    label: str | int | None = None
    line: int = 0


@dataclass(frozen=True)
class Dataset:
    """An ordered set of examples with resolved label indices (``None`` when unlabelled)."""

    examples: tuple[Example, ...]
    label_ids: tuple[int, ...] | None
    source: str

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def texts(self) -> list[str]:
        return [e.text for e in self.examples]

    @property
    def text_pairs(self) -> list[str] | None:
        pairs = [e.text_pair for e in self.examples]
        return None if all(p is None for p in pairs) else [p or "" for p in pairs]


@dataclass(frozen=True)
class DataSplit:
    """Disjoint scoring (importance, recovery) and evaluation (quality) parts."""

    score: Dataset
    eval: Dataset
    source: str

    @property
    def has_labels(self) -> bool:
        return self.score.label_ids is not None


@dataclass
class Batch:
    """Model inputs for one batch plus optional label indices."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return int(self.inputs["input_ids"].shape[0])

    @property
    def attention_mask(self) -> torch.Tensor:
        return self.inputs["attention_mask"]


# ---------------------------------------------------------------------------------------------
# Reading


def read_examples(path: str | Path) -> list[Example]:
    """Parse ``path`` as JSON Lines or plain text (see the module docstring).

    Raises :class:`DataError` naming the file and line for a missing file, an empty file, a
    line that is not a JSON object, a missing/empty ``text``, unknown keys, or a label on some
    lines but not others.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; pass an existing file to --data")
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: byte {exc.start} is not UTF-8; save the file as UTF-8 text") from exc
    lines = content.splitlines()
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    if not numbered:
        raise DataError(f"{path} is empty; give one text per line, or JSON Lines with a 'text' field")
    is_jsonl = path.suffix.lower() in _JSONL_SUFFIXES or numbered[0][1].lstrip().startswith("{")
    examples = _parse_jsonl(path, numbered) if is_jsonl else [Example(text=t.strip(), line=n) for n, t in numbered]
    return examples


def _parse_jsonl(path: Path, numbered: list[tuple[int, str]]) -> list[Example]:
    examples: list[Example] = []
    for number, line in numbered:
        where = f"{path}:{number}"
        try:
            row: Any = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); each line must be one JSON "
                'object such as {"text": "..."}'
            ) from exc
        if not isinstance(row, dict):
            raise DataError(f'{where}: expected a JSON object such as {{"text": "..."}}, got {type(row).__name__}')
        unknown = sorted(set(row) - _KNOWN_KEYS)
        if unknown:
            raise DataError(f"{where}: unknown field(s) {', '.join(unknown)}; allowed: text, text_pair, label")
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: missing or empty 'text' (a non-empty string); add it or delete the line")
        pair = row.get("text_pair")
        if pair is not None and (not isinstance(pair, str) or not pair.strip()):
            raise DataError(f"{where}: 'text_pair' must be a non-empty string when present")
        label = row.get("label")
        if label is not None and (isinstance(label, bool) or not isinstance(label, (str, int))):
            raise DataError(f"{where}: 'label' must be a label name or an integer index, got {label!r}")
        examples.append(Example(text=text.strip(), text_pair=pair.strip() if pair else None, label=label, line=number))
    labelled = [e.label is not None for e in examples]
    if any(labelled) and not all(labelled):
        odd = next(e for e, has in zip(examples, labelled) if has != labelled[0])
        problem = "has no 'label'" if labelled[0] else "has a 'label'"
        raise DataError(
            f"{path}:{odd.line}: {problem} but line {examples[0].line} {'has one' if labelled[0] else 'does not'}; "
            "label every line or none"
        )
    return examples


def default_examples() -> list[Example]:
    """The bundled default corpus (one sentence per line)."""
    text = (resources.files("pruneserve.optimizer") / "data" / DEFAULT_CORPUS).read_text(encoding="utf-8")
    return [Example(text=line, line=i + 1) for i, line in enumerate(text.splitlines()) if line.strip()]


# ---------------------------------------------------------------------------------------------
# Deduplication, labels and splitting


def _key(example: Example) -> tuple[str, str]:
    return (" ".join(example.text.split()), " ".join((example.text_pair or "").split()))


def deduplicate(examples: Sequence[Example]) -> list[Example]:
    """Keep the first occurrence of each (whitespace-normalised) text and pair."""
    seen: set[tuple[str, str]] = set()
    unique: list[Example] = []
    for example in examples:
        key = _key(example)
        if key not in seen:
            seen.add(key)
            unique.append(example)
    if len(unique) < len(examples):
        logger.info("dropped %d duplicate examples", len(examples) - len(unique))
    return unique


def resolve_labels(examples: Sequence[Example], labels: Sequence[str], source: str) -> tuple[int, ...] | None:
    """Map each example's label (name or index) to an index into the model's ``labels``.

    Returns ``None`` when the examples carry no labels. Raises :class:`DataError` naming the
    line for a label the model does not know.
    """
    if not examples or examples[0].label is None:
        return None
    if not labels:
        raise DataError(
            f"{source}:{examples[0].line}: the data has labels but the model is an embedding model "
            "with none; remove the 'label' field"
        )
    index = {name: i for i, name in enumerate(labels)}
    ids: list[int] = []
    for example in examples:
        label = example.label
        if isinstance(label, int) and 0 <= label < len(labels):
            ids.append(label)
        elif isinstance(label, str) and label in index:
            ids.append(index[label])
        else:
            raise DataError(
                f"{source}:{example.line}: label {label!r} is not one of the model's labels "
                f"({', '.join(labels)}) or an index 0..{len(labels) - 1}; fix the label or use another model"
            )
    return tuple(ids)


#: The fewest held-out examples a quality figure is taken from, and the fewest scoring
#: examples (a few batches of the in-batch contrastive loss, a least-squares refit with more
#: tokens than unknowns per row). Below these the scores, the recovery and the quality figure
#: are noise, and the report would blame pruning or quantization for it.
MIN_EVAL_EXAMPLES = 4
MIN_SCORE_EXAMPLES = 8
#: Under this many held-out examples the quality figure is logged as noisy (but accepted).
FEW_EVAL_EXAMPLES = 50


def _eval_size(total: int, eval_fraction: float) -> int:
    return min(total - 1, max(1, round(total * eval_fraction)))


def examples_needed(eval_fraction: float) -> int:
    """The fewest distinct examples that split into ``MIN_EVAL_EXAMPLES`` held-out and
    ``MIN_SCORE_EXAMPLES`` scoring examples at ``eval_fraction``."""
    total = MIN_EVAL_EXAMPLES + MIN_SCORE_EXAMPLES
    while True:
        n_eval = _eval_size(total, eval_fraction)
        if n_eval >= MIN_EVAL_EXAMPLES and total - n_eval >= MIN_SCORE_EXAMPLES:
            return total
        total += 1


def split_examples(
    examples: Sequence[Example], config: DataConfig, source: str
) -> tuple[list[Example], list[Example]]:
    """Deduplicate, shuffle with ``config.seed``, cap at ``max_examples`` and split.

    The evaluation part gets ``round(n * eval_fraction)`` examples, the scoring part the rest.
    Raises :class:`DataError` naming how many distinct examples there are and how many are
    needed when either part would fall under ``MIN_EVAL_EXAMPLES`` / ``MIN_SCORE_EXAMPLES``,
    before any model work starts.
    """
    unique = deduplicate(examples)
    order = list(range(len(unique)))
    random.Random(config.seed).shuffle(order)
    if config.max_examples is not None:
        order = order[: config.max_examples]
    needed = examples_needed(config.eval_fraction)
    if len(order) < needed:
        capped = len(order) < len(unique)
        have = (f"--max-examples {config.max_examples} keeps {len(order)} of its {len(unique)} distinct examples"
                if capped else f"has {len(unique)} distinct example(s)")
        fix = (f"raise --max-examples to at least {needed}" if capped and len(unique) >= needed
               else "add texts to the --data file")
        raise DataError(
            f"{source} {have}; at least {needed} are needed at eval_fraction {config.eval_fraction:g} "
            f"({MIN_EVAL_EXAMPLES} held out to measure quality, {MIN_SCORE_EXAMPLES} to score and recover); "
            f"{fix} (a few hundred give meaningful scores)"
        )
    n_eval = _eval_size(len(order), config.eval_fraction)
    if n_eval < FEW_EVAL_EXAMPLES:
        logger.warning("data from %s: quality is measured on only %d held-out examples, so it is a noisy figure; "
                       "a few hundred examples give a steadier one", source, n_eval)
    eval_part = [unique[i] for i in order[:n_eval]]
    score_part = [unique[i] for i in order[n_eval:]]
    return score_part, eval_part


def load_data(config: DataConfig, labels: Sequence[str] = ()) -> DataSplit:
    """Read ``config.path`` (or the default corpus), resolve labels and split.

    ``labels`` are the model's label names (empty for embedding models). Labels in the data are
    checked against them before any split, so the error names the first bad line.
    """
    if config.path is None:
        examples, source = default_examples(), DEFAULT_SOURCE
    else:
        examples, source = read_examples(config.path), str(config.path)
    if examples[0].label is not None and not labels:
        logger.warning("%s: the model is an embedding model; ignoring the 'label' field", source)
        examples = [Example(e.text, e.text_pair, None, e.line) for e in examples]
    resolve_labels(examples, labels, source)  # fail on the first bad line, before splitting
    score_part, eval_part = split_examples(examples, config, source)
    logger.info("data from %s: %d scoring, %d evaluation examples", source, len(score_part), len(eval_part))
    return DataSplit(
        score=Dataset(tuple(score_part), resolve_labels(score_part, labels, source), source),
        eval=Dataset(tuple(eval_part), resolve_labels(eval_part, labels, source), source),
        source=source,
    )


# ---------------------------------------------------------------------------------------------
# Batching


def make_batches(
    dataset: Dataset,
    tokenizer: Tokenizer,
    *,
    batch_size: int,
    max_length: int,
    uses_token_type_ids: bool,
    by_length: bool = False,
    seed: int = 0,
) -> list[Batch]:
    """Tokenize ``dataset`` into padded batches of ``batch_size``.

    In order by default. With ``by_length`` the examples are sorted by token count (stable)
    before they are cut into batches, and the batches are then shuffled with ``seed``: each
    batch pads to a similar length (measured on the bundled corpus: 93 k padded positions for
    39 k real tokens in order, about 1.1x the real tokens sorted; every stage's cost is
    proportional to the padded positions), while any prefix of the batches is still a spread of
    lengths, not the shortest texts (scoring uses only the first ``max_examples`` texts).

    A trailing batch of a single example is merged into the previous one, because the in-batch
    contrastive loss needs at least two texts.
    """
    import torch

    from pruneserve.optimizer.adapters import tokenize

    texts, pairs = dataset.texts, dataset.text_pairs
    order = list(range(len(dataset)))
    if by_length and len(dataset) > batch_size:
        lengths = tokenize(tokenizer, texts, pairs, max_length, uses_token_type_ids)["attention_mask"].sum(1)
        order = sorted(order, key=lambda i: int(lengths[i]))
    bounds = list(range(0, len(dataset), batch_size))
    if len(bounds) > 1 and len(dataset) - bounds[-1] == 1:
        bounds.pop()
    ends = bounds[1:] + [len(dataset)]
    batches: list[Batch] = []
    for start, end in zip(bounds, ends):
        chosen = order[start:end]
        inputs = tokenize(
            tokenizer,
            [texts[i] for i in chosen],
            [pairs[i] for i in chosen] if pairs is not None else None,
            max_length,
            uses_token_type_ids,
        )
        labels = None
        if dataset.label_ids is not None:
            labels = torch.tensor([dataset.label_ids[i] for i in chosen], dtype=torch.long)
        batches.append(Batch(inputs=dict(inputs), labels=labels))
    if by_length:
        random.Random(seed).shuffle(batches)
    return batches


# ---------------------------------------------------------------------------------------------
# The default corpus

_HEADING = re.compile(r"^\s*[*=\-~^\"]{3,}\s*$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"(])")
_BULLET = re.compile(r"^\s*[*-] ")


def _paragraphs(doc: str) -> Iterator[str]:
    """Prose paragraphs of one pydoc topic: no headings, grammar, doctests or tables."""
    for block in re.split(r"\n\s*\n", doc):
        lines = [line for line in block.splitlines() if line.strip()]
        if not lines or any(_HEADING.match(line) for line in lines):
            continue
        # More than two indentation levels in one block is code or a nested table, not prose.
        if len({len(line) - len(line.lstrip()) for line in lines}) > 2:
            continue
        if any(line.lstrip().startswith((">>>", "...", "|", "+-")) or "::=" in line for line in lines):
            continue
        yield " ".join(_BULLET.sub("", line).strip() for line in lines)


def _is_prose(sentence: str) -> bool:
    words = sentence.split()
    if not 5 <= len(words) <= 50 or sentence[-1] not in ".!?" or not sentence[0].isupper():
        return False
    letters = sum(c.isalpha() or c == " " for c in sentence)
    return letters / len(sentence) >= 0.85 and not any(t in sentence for t in ("::=", ">>>", "http"))


def build_default_corpus() -> list[str]:
    """Extract deduplicated English sentences from ``pydoc_data.topics`` (stdlib), in a fixed order.

    Topics are visited in sorted order; paragraphs that look like code, grammar or tables are
    skipped; sentences of 5-50 words that are mostly letters are kept once (case-insensitively).
    """
    from pydoc_data.topics import topics

    sentences: list[str] = []
    seen: set[str] = set()
    for name in sorted(topics):
        for paragraph in _paragraphs(topics[name]):
            for raw in _SENTENCE_END.split(paragraph):
                sentence = " ".join(raw.replace('"', "").replace("*", "").split())
                if sentence and _is_prose(sentence) and sentence.lower() not in seen:
                    seen.add(sentence.lower())
                    sentences.append(sentence)
    return sentences


def main(argv: Sequence[str] | None = None) -> int:
    """Print the default corpus, one sentence per line (regenerates ``data/pydoc_sentences.txt``)."""
    del argv
    for sentence in build_default_corpus():
        sys.stdout.write(sentence + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
