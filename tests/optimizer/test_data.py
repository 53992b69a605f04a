"""Calibration data: parsing, the disjoint deterministic split, and every bad-input error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pruneserve.optimizer.config import DataConfig
from pruneserve.optimizer.data import (
    MIN_EVAL_EXAMPLES,
    MIN_SCORE_EXAMPLES,
    build_default_corpus,
    default_examples,
    examples_needed,
    load_data,
    read_examples,
    resolve_labels,
    split_examples,
)
from pruneserve.optimizer.errors import DataError


def _write(tmp_path: Path, name: str, lines: list[str]) -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_plain_text_one_example_per_line_skips_blanks(tmp_path: Path) -> None:
    path = _write(tmp_path, "t.txt", ["first text", "", "  second text  ", "third"])
    examples = read_examples(path)
    assert [e.text for e in examples] == ["first text", "second text", "third"]
    assert [e.line for e in examples] == [1, 3, 4]
    assert all(e.label is None and e.text_pair is None for e in examples)


def test_jsonl_with_pairs_and_labels(tmp_path: Path) -> None:
    rows = [{"text": "a b", "text_pair": "c", "label": "pos"}, {"text": "d", "text_pair": "e", "label": 0}]
    examples = read_examples(_write(tmp_path, "d.jsonl", [json.dumps(r) for r in rows]))
    assert [(e.text, e.text_pair, e.label) for e in examples] == [("a b", "c", "pos"), ("d", "e", 0)]
    assert resolve_labels(examples, ["neg", "pos"], "d.jsonl") == (1, 0)


def test_json_objects_detected_without_jsonl_suffix(tmp_path: Path) -> None:
    examples = read_examples(_write(tmp_path, "d.txt", ['{"text": "hello"}']))
    assert examples[0].text == "hello"


@pytest.mark.parametrize(
    ("lines", "line", "needle"),
    [
        (['{"text": "ok"}', '{"text": oops}'], 2, "not valid JSON"),
        (['{"text": "ok"}', '["a list"]'], 2, "expected a JSON object"),
        (['{"text": "ok"}', '{"txt": "typo"}'], 2, "unknown field(s) txt"),
        (['{"text": "ok"}', '{"text": "  "}'], 2, "missing or empty 'text'"),
        (['{"text": "ok"}', '{"label": "x"}'], 2, "missing or empty 'text'"),
        (['{"text": "a", "label": "x"}', "", '{"text": "b"}'], 3, "has no 'label'"),
        (['{"text": "a"}', '{"text": "b", "label": "x"}'], 2, "has a 'label'"),
        (['{"text": "a", "text_pair": 3}'], 1, "'text_pair' must be a non-empty string"),
        (['{"text": "a", "label": [1]}'], 1, "'label' must be a label name"),
    ],
)
def test_bad_jsonl_names_file_line_and_fix(tmp_path: Path, lines: list[str], line: int, needle: str) -> None:
    path = _write(tmp_path, "bad.jsonl", lines)
    with pytest.raises(DataError) as err:
        read_examples(path)
    assert f"{path}:{line}:" in str(err.value)
    assert needle in str(err.value)


def test_missing_empty_and_non_utf8_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_examples(tmp_path / "nope.txt")
    empty = _write(tmp_path, "empty.txt", ["", "   "])
    with pytest.raises(DataError, match=rf"{empty} is empty"):
        read_examples(empty)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"ok\n\xff\xfe\n")
    with pytest.raises(DataError, match="not UTF-8"):
        read_examples(binary)


def test_unknown_label_names_line_and_labels(tmp_path: Path) -> None:
    path = _write(tmp_path, "d.jsonl", ['{"text": "a", "label": "neg"}', '{"text": "b", "label": "maybe"}',
                                         '{"text": "c", "label": 7}'])
    with pytest.raises(DataError) as err:
        load_data(DataConfig(path=str(path)), labels=["neg", "pos"])
    assert f"{path}:2:" in str(err.value) and "'maybe'" in str(err.value) and "neg, pos" in str(err.value)
    good = _write(tmp_path, "g.jsonl", ['{"text": "a", "label": "neg"}', '{"text": "b", "label": 7}'])
    with pytest.raises(DataError, match=r"g.jsonl:2: label 7"):
        load_data(DataConfig(path=str(good)), labels=["neg", "pos"])


def test_labels_on_embedding_model_are_ignored(tmp_path: Path) -> None:
    path = _write(tmp_path, "d.jsonl", [json.dumps({"text": f"t{i}", "label": "x"}) for i in range(20)])
    split = load_data(DataConfig(path=str(path)), labels=[])
    assert not split.has_labels


def test_split_is_disjoint_deduplicated_and_deterministic(tmp_path: Path) -> None:
    texts = [f"sentence number {i % 150}" for i in range(300)]  # every text twice
    texts += ["sentence  number 3", " sentence number 4 "]  # whitespace variants of duplicates
    path = _write(tmp_path, "dup.txt", texts)
    config = DataConfig(path=str(path), eval_fraction=0.2, seed=3)
    a, b = load_data(config), load_data(config)
    assert a.score.texts == b.score.texts and a.eval.texts == b.eval.texts
    norm = lambda t: " ".join(t.split())  # noqa: E731
    score, evaluation = {norm(t) for t in a.score.texts}, {norm(t) for t in a.eval.texts}
    assert not score & evaluation
    assert len(score) + len(evaluation) == 150 == len(a.score) + len(a.eval)
    assert len(a.eval) == 30
    other = load_data(DataConfig(path=str(path), eval_fraction=0.2, seed=4))
    assert other.eval.texts != a.eval.texts


def test_max_examples_caps_the_total(tmp_path: Path) -> None:
    path = _write(tmp_path, "d.txt", [f"text {i}" for i in range(100)])
    split = load_data(DataConfig(path=str(path), max_examples=40, eval_fraction=0.25))
    assert (len(split.score), len(split.eval)) == (30, 10)


def test_too_few_distinct_examples(tmp_path: Path) -> None:
    path = _write(tmp_path, "one.txt", ["same", "same", " same "])
    with pytest.raises(DataError, match="1 distinct example"):
        split_examples(read_examples(path), DataConfig(), str(path))


def test_too_little_data_is_refused_naming_the_counts_and_the_fix(tmp_path: Path) -> None:
    path = _write(tmp_path, "three.txt", ["The first text.", "The second text.", "The third text."])
    with pytest.raises(DataError) as info:
        load_data(DataConfig(path=str(path)))
    message = str(info.value)
    assert str(path) in message and "has 3 distinct example(s)" in message
    assert "at least 14 are needed at eval_fraction 0.25" in message and "add texts to the --data file" in message
    # Enough texts, but --max-examples keeps too few: the fix is the flag, not the file.
    path = _write(tmp_path, "many.txt", [f"text number {i}" for i in range(100)])
    with pytest.raises(DataError, match=r"--max-examples 10 keeps 10 of its 100 .* raise --max-examples to at least 14"):
        load_data(DataConfig(path=str(path), max_examples=10))
    split = load_data(DataConfig(path=str(path), max_examples=14))
    assert (len(split.eval), len(split.score)) == (4, 10)


@pytest.mark.parametrize("fraction", [0.05, 0.25, 0.5, 0.9])
def test_examples_needed_is_the_smallest_total_that_splits(fraction: float) -> None:
    def parts(n: int) -> tuple[int, int]:
        n_eval = min(n - 1, max(1, round(n * fraction)))
        return n_eval, n - n_eval

    def enough(n: int) -> bool:
        n_eval, n_score = parts(n)
        return n_eval >= MIN_EVAL_EXAMPLES and n_score >= MIN_SCORE_EXAMPLES

    needed = examples_needed(fraction)
    assert enough(needed) and not enough(needed - 1)


def test_default_corpus_is_real_english_and_matches_its_generator() -> None:
    shipped = [e.text for e in default_examples()]
    assert 1800 <= len(shipped) <= 2500
    assert len({s.lower() for s in shipped}) == len(shipped)
    assert all(s[0].isupper() and s[-1] in ".!?" and len(s.split()) >= 5 for s in shipped)
    words = " ".join(shipped).lower().split()
    assert words.count("the") > 1000  # prose, not code
    # The generator is deterministic; on the Python version the file was built with it reproduces it.
    rebuilt = build_default_corpus()
    assert rebuilt == build_default_corpus()
    assert len(set(rebuilt) & set(shipped)) > 0.8 * len(shipped)


def test_default_data_split_sizes() -> None:
    split = load_data(DataConfig())
    assert (len(split.score), len(split.eval)) == (1500, 500)
    assert not set(split.score.texts) & set(split.eval.texts)


def test_length_bucketed_batches_keep_every_example_and_pad_less(tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    from pruneserve.optimizer.adapters import load_model
    from pruneserve.optimizer.data import Dataset, Example, make_batches

    loaded = load_model(tiny_model_dir("bert", "classification"))
    texts = [e.text for e in default_examples()[:100]]
    dataset = Dataset(tuple(Example(t, line=i + 1) for i, t in enumerate(texts)), tuple(i % 2 for i in range(100)), "t")
    options = {"batch_size": 16, "max_length": 512, "uses_token_type_ids": True}
    plain = make_batches(dataset, loaded.tokenizer, **options)
    bucketed = make_batches(dataset, loaded.tokenizer, **options, by_length=True, seed=3)
    assert make_batches(dataset, loaded.tokenizer, **options, by_length=True, seed=3)[0].inputs["input_ids"].equal(
        bucketed[0].inputs["input_ids"])  # deterministic

    def rows(batches: list) -> list[tuple[tuple[int, ...], int]]:
        out = []
        for b in batches:
            for ids, mask, label in zip(b.inputs["input_ids"], b.attention_mask, b.labels):
                out.append((tuple(ids[mask.bool()].tolist()), int(label)))
        return sorted(out)

    assert rows(bucketed) == rows(plain)  # same texts, each with its own label
    assert [b.size for b in bucketed].count(16) == 6 and sum(b.size for b in bucketed) == 100
    padded = {name: sum(b.attention_mask.numel() for b in bs) for name, bs in (("plain", plain), ("bucketed", bucketed))}
    assert padded["bucketed"] < 0.8 * padded["plain"], padded
    # The batch order is shuffled: the first batches are not simply the shortest texts.
    widths = [b.attention_mask.shape[1] for b in bucketed]
    assert widths != sorted(widths)
