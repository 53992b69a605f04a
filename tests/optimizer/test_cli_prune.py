"""``pruneserve score`` and ``pruneserve prune`` end to end on a tiny model, and their error handling."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import pytest
import torch
from prune_testing import TEXTS

from pruneserve.cli import main
from pruneserve.optimizer.checkpoint import load_pruned

TinyModelFactory = Callable[..., Path]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model(tiny_model_dir: TinyModelFactory) -> Path:
    return tiny_model_dir("bert", "embedding")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "texts.txt"
    path.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    return path


def _common(model: Path, data: Path) -> list[str]:
    return ["--model", str(model), "--data", str(data), "--max-length", "32", "--batch-size", "16", "--no-progress"]


def test_score_writes_json_and_heatmap(model: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "scores"
    assert main(["score", *_common(model, data), "--method", "fisher", "--out", str(out)]) == 0
    document = json.loads((out / "importance.json").read_text())
    assert document["method"] == "fisher" and document["loss"] == "contrastive"
    assert len(document["heads"]) == 3 and all(len(row) == 4 for row in document["heads"])
    assert all(len(row) == 64 for row in document["ffn"])
    assert document["examples"] == 72  # 96 texts, a quarter held out
    assert (out / "importance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in capsys.readouterr().out


def test_prune_writes_a_loadable_checkpoint_and_record(model: Path, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "pruned"
    code = main(["prune", *_common(model, data), "--heads", "0.5", "--ffn", "0.25", "--distill-steps", "5",
                 "--out", str(out)])
    assert code == 0
    encoder, document = load_pruned(out)
    record = document["record"]
    assert sum(encoder.spec.heads) == 6 and sum(encoder.spec.ffn) == 192 - 48
    assert record["heads_per_layer"] == encoder.spec.heads
    assert [len(k) for k in record["kept_heads"]] == encoder.spec.heads
    stages = [s["method"] for s in record["quality"]["stages"]]
    assert stages == ["pruned", "refit", "distillation"]
    assert record["quality"]["after_recovery"]["mean_cosine"] > record["quality"]["before_recovery"]["mean_cosine"]
    assert record["params"]["after"] < record["params"]["before"]
    assert record["flops"]["after"] < record["flops"]["before"]
    assert record["config"]["budget"]["head_fraction"] == 0.5
    assert record["config"]["recovery"]["distill_steps"] == 5
    assert record["search_trace"][0]["flops_removed"] == 0
    assert "texts.txt" in record["quality"]["data"]
    for name in ("model.safetensors", "tokenizer.json", "pruning.json", "importance.png", "tradeoff.png"):
        assert (out / name).is_file(), name


def test_config_file_then_flags(model: Path, data: Path, tmp_path: Path) -> None:
    config = tmp_path / "prune.yaml"
    config.write_text("budget:\n  head_fraction: 0.25\n  ffn_fraction: 0.5\nimportance:\n  method: fisher\n")
    out = tmp_path / "pruned"
    code = main(["prune", *_common(model, data), "--config", str(config), "--ffn", "0", "--no-recovery",
                 "--out", str(out)])
    assert code == 0
    encoder, document = load_pruned(out)
    record = document["record"]
    assert sum(encoder.spec.heads) == 9 and sum(encoder.spec.ffn) == 192  # --ffn 0 overrode the file
    assert record["importance"]["method"] == "fisher"
    assert [s["method"] for s in record["quality"]["stages"]] == ["pruned"]


def test_recovery_flags_reach_the_config(model: Path, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "pruned"
    code = main(["prune", *_common(model, data), "--heads", "0.25", "--no-ffn-refit", "--distill-steps", "2",
                 "--lr", "3e-4", "--lr-schedule", "constant", "--distill-hidden-weight", "0.5", "--out", str(out)])
    assert code == 0
    recovery = load_pruned(out)[1]["record"]["config"]["recovery"]
    assert (recovery["lr"], recovery["lr_schedule"], recovery["distill_hidden_weight"]) == (3e-4, "constant", 0.5)
    assert recovery["refit_ffn"] is False and recovery["distill_steps"] == 2


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--heads", "1.5"], "budget.head_fraction=1.5 is outside [0.0, 1.0]"),
        (["--heads", "1.0"], "at most 11 (0.917) can go"),
        (["--heads", "0", "--ffn", "0"], "budget removes nothing"),
        (["--temperature", "0"], "importance.temperature=0.0"),
        (["--quality-floor", "0.99999", "--step-fraction", "0.5"], "quality floor 0.99999 cannot be met"),
    ],
)
def test_bad_budget_or_flags_exit_2_and_write_nothing(
    model: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture, extra: list[str], needle: str
) -> None:
    out = tmp_path / "never"
    assert main(["prune", *_common(model, data), *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not out.exists()


def test_bad_inputs_exit_2_and_write_nothing(
    model: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "never"
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"text": "fine"}\n{"txt": "typo"}\n')
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("budget:\n  head_fractoin: 0.5\n")
    cases = [
        (["score", *_common(model, tmp_path / "missing.txt")], "does not exist"),
        (["prune", *_common(model, bad_jsonl)], f"{bad_jsonl}:2: unknown field(s) txt"),
        (["prune", *_common(tmp_path / "no-model", data)], "does not exist"),
        (["prune", *_common(model, data), "--config", str(bad_yaml)], "unknown key(s) head_fractoin"),
    ]
    for argv, needle in cases:
        assert main([*argv, "--out", str(out)]) == 2, argv
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, err
        assert not out.exists()


def test_help_explains_the_commands(capsys: pytest.CaptureFixture) -> None:
    for command in ("score", "prune"):
        with pytest.raises(SystemExit) as exc:
            main([command, "--help"])
        assert exc.value.code == 0
        text = capsys.readouterr().out
        assert "examples:" in text and "--data" in text
    assert "--quality-floor" in text and "--no-recovery" in text


def test_prepared_data_gives_the_same_result_and_is_not_recomputed(
    model: Path, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``run_pruning(prepared=...)`` (the optimize pipeline's path) equals the plain path, with no second
    pass of the teacher over the data."""
    from pruneserve.optimizer import pruner
    from pruneserve.optimizer.adapters import load_model
    from pruneserve.optimizer.config import BudgetConfig, DataConfig, PruneConfig, RecoveryConfig

    loaded = load_model(model)
    config = PruneConfig(
        data=DataConfig(path=str(data), max_length=32, batch_size=16),
        budget=BudgetConfig(head_fraction=0.5, ffn_fraction=0.25),
        recovery=RecoveryConfig(distill_steps=5),
    )
    plain = pruner.run_pruning(loaded, config, progress=False)
    prepared = pruner.prepare(loaded, config.data)
    calls: list[int] = []
    monkeypatch.setattr(pruner, "teacher_outputs", lambda *a, **k: calls.append(1) or [])
    again = pruner.run_pruning(loaded, config, progress=False, prepared=prepared)
    assert calls == []
    assert again.plan == plain.plan
    assert [s.method for s in again.recovery] == [s.method for s in plain.recovery]
    for a, b in zip(again.recovery, plain.recovery):
        assert a.quality.mean_cosine == pytest.approx(b.quality.mean_cosine, abs=1e-5), (a, b)
    assert set(again.timings) >= {"data", "teacher_outputs", "search", "recovery"}
    state = plain.encoder.state_dict()
    for key, value in again.encoder.state_dict().items():
        torch.testing.assert_close(value, state[key], atol=1e-5, rtol=0)


# -- issue 17: config merges, stages that connect, interrupts and logs -------------------------------------


def test_preset_then_yaml_then_flags_field_by_field(tmp_path: Path) -> None:
    from pruneserve.cli import build_parser
    from pruneserve.optimizer.commands_prune import build_prune_config

    config = tmp_path / "prune.yaml"
    config.write_text("budget:\n  head_fraction: 0.25\nrecovery:\n  distill_steps: 7\n")
    args = build_parser().parse_args(["prune", "--preset", "aggressive", "--config", str(config), "--lr", "3e-4",
                                      "--out", str(tmp_path / "out")])
    resolved = build_prune_config(args)
    assert resolved.budget.head_fraction == 0.25  # the YAML over the preset's 0.5 ...
    assert resolved.budget.ffn_fraction == 0.25  # ... which keeps the fields the YAML does not name
    assert resolved.recovery.distill_steps == 7 and resolved.recovery.lr == 3e-4  # YAML, then the flag
    assert resolved.recovery.refit_ffn is True


def test_relative_data_path_in_yaml_is_relative_to_the_yaml(
    model: Path, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = tmp_path / "settings"
    settings.mkdir()
    (settings / "texts.txt").write_text(data.read_text())
    (settings / "prune.yaml").write_text("data:\n  path: texts.txt\nbudget:\n  head_fraction: 0.25\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code = main(["prune", "--model", str(model), "--config", str(settings / "prune.yaml"), "--max-length", "32",
                 "--no-recovery", "--no-progress", "--out", "pruned"])  # a flag's path: relative to the cwd
    assert code == 0
    record = load_pruned(elsewhere / "pruned")[1]["record"]
    assert record["config"]["data"]["path"] == str(settings / "texts.txt")
    assert record["source_path"] == str(model.resolve())


def _scores(model: Path, data: Path, out: Path) -> dict:
    assert main(["score", *_common(model, data), "--out", str(out)]) == 0
    return json.loads((out / "importance.json").read_text())


def test_prune_from_scores_uses_them_for_the_first_step(
    model: Path, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pruneserve.optimizer import search

    scores = tmp_path / "scores"
    document = _scores(model, data, scores)
    # Scores no scoring pass would give: exactly these three heads are the least important.
    document["heads"] = [[0.0 if (layer, head) in {(0, 0), (1, 1), (2, 2)} else 1.0 for head in range(4)]
                         for layer in range(3)]
    (scores / "importance.json").write_text(json.dumps(document))

    def no_scoring(*args: object, **kwargs: object) -> None:
        raise AssertionError("--scores replaces the first scoring pass, and one step needs no other")

    monkeypatch.setattr(search, "compute_importance", no_scoring)
    out = tmp_path / "pruned"
    code = main(["prune", *_common(model, data), "--scores", str(scores), "--heads", "0.25", "--step-fraction",
                 "0.25", "--no-recovery", "--out", str(out)])
    assert code == 0
    record = load_pruned(out)[1]["record"]
    assert record["kept_heads"] == [[1, 2, 3], [0, 2, 3], [0, 1, 3]]
    assert record["importance"]["heads"] == document["heads"] and record["importance"]["ffn"] == document["ffn"]
    assert record["scores_from"] == str(scores)


def test_prune_refuses_scores_of_another_model_or_shape(
    model: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    scores = tmp_path / "scores"
    document = _scores(model, data, scores)
    out = tmp_path / "never"
    for change, needle in (({"model_sha256": "0" * 64}, "was scored on model"),
                           ({"heads": document["heads"][:2]}, "holds scores of shape")):
        (scores / "importance.json").write_text(json.dumps({**document, **change}))
        capsys.readouterr()
        assert main(["prune", *_common(model, data), "--scores", str(scores), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and needle in err and "Traceback" not in err, err
        assert not out.exists()
    not_scores = tmp_path / "not-scores"
    not_scores.mkdir()
    assert main(["prune", *_common(model, data), "--scores", str(not_scores), "--out", str(out)]) == 2
    assert "pruneserve score" in capsys.readouterr().err
    # --out may never be inside (or hold) the scores it reads.
    assert main(["prune", *_common(model, data), "--scores", str(scores), "--out", str(scores / "out")]) == 2
    assert "inside the --scores path" in capsys.readouterr().err


def test_a_refused_flag_value_names_the_flag(model: Path, data: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "never"
    assert main(["prune", *_common(model, data), "--heads", "1.5", "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("error: --heads 1.5: budget.head_fraction=1.5 is outside")
    assert main(["prune", *_common(model, data), "--distill-steps", "-1", "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("error: --distill-steps -1: recovery.distill_steps=-1 is below")
    # The same value from a YAML file is named by its key, the only name the user wrote.
    config = tmp_path / "prune.yaml"
    config.write_text("budget:\n  head_fraction: 1.5\n")
    capsys.readouterr()
    assert main(["prune", *_common(model, data), "--config", str(config), "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("error: budget.head_fraction=1.5 is outside")
    assert main(["score", *_common(model, data), "--temperature", "0", "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("error: --temperature 0.0: importance.temperature=0.0")


def test_progress_bars_only_on_a_terminal(model: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from pruneserve.optimizer import pruner

    common = [a for a in _common(model, data) if a != "--no-progress"]
    assert main(["score", *common, "--out", str(tmp_path / "scores")]) == 0
    err = capsys.readouterr().err
    assert "scoring" not in err and "batch/s" not in err and "it/s" not in err, err  # stderr is no terminal

    seen: list[bool] = []

    def record_progress(loaded: object, config: object, progress: bool = True, **kwargs: object) -> None:
        seen.append(progress)
        raise KeyboardInterrupt  # stop here: only the choice matters

    monkeypatch.setattr(pruner, "run_pruning", record_progress)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    for extra in ([], ["--no-progress"]):
        assert main(["prune", *common, *extra, "--out", str(tmp_path / "never")]) == 130
    assert seen == [True, False]


def test_log_level_before_or_after_the_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from pruneserve.cli import build_parser

    parser = build_parser()
    out = ["--out", str(tmp_path)]
    assert parser.parse_args(["prune", "--log-level", "DEBUG", *out]).log_level == "DEBUG"
    assert parser.parse_args(["--log-level", "ERROR", "score", *out]).log_level == "ERROR"
    assert parser.parse_args(["--log-level", "ERROR", "optimize", "--log-level", "DEBUG", *out]).log_level == "DEBUG"
    monkeypatch.setenv("PRUNESERVE_LOG_LEVEL", "WARNING")
    assert build_parser().parse_args(["serve", str(tmp_path)]).log_level == "WARNING"
    assert build_parser().parse_args(["serve", str(tmp_path), "--log-level", "DEBUG"]).log_level == "DEBUG"


def test_ctrl_c_prints_one_line_exits_130_and_leaves_nothing(
    model: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pruneserve.optimizer import plots

    def interrupt(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    # While the figures are drawn: the checkpoint is already in the staging folder beside --out.
    monkeypatch.setattr(plots, "tradeoff_curve", interrupt)
    out = tmp_path / "out"
    assert main(["prune", *_common(model, data), "--heads", "0.25", "--no-recovery", "--out", str(out)]) == 130
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"interrupted; nothing was written to {out}"]
    assert list(tmp_path.iterdir()) == []  # no --out, no hidden staging sibling


def test_unsupported_architecture_gets_its_real_error_first(tmp_path: Path, data: Path,
                                                            capsys: pytest.CaptureFixture,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    for model_type, arch in (("gpt2", "GPT2LMHeadModel"), ("modernbert", "ModernBertModel")):
        folder = tmp_path / model_type
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": model_type, "architectures": [arch]}))
        caplog.clear()
        assert main(["prune", "--model", str(folder), "--data", str(data), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: model_type '{model_type}' is not supported"), err
        assert not [r for r in caplog.records if r.levelname == "WARNING"], caplog.text


def test_model_given_as_its_config_json_says_what_to_pass(model: Path, data: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    assert main(["score", *_common(model / "config.json", data), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"pass the folder that holds config.json: {model}/" in err and "does not exist" not in err, err
