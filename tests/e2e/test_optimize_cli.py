"""``pruneserve optimize`` end to end on a tiny model: the CLI writes an artifact an ONNX Runtime
session answers from, and every user error exits 2 with a clear message and writes nothing."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import yaml

from pruneserve.artifact import load_artifact
from pruneserve.cli import main

_FIXTURES = Path(__file__).resolve().parents[1] / "optimizer" / "conftest.py"


def _write_tiny_model(folder: Path, **options: object) -> Path:
    # tests/ folders are not packages: load the optimizer tests' model writer by path.
    spec = importlib.util.spec_from_file_location("optimizer_test_fixtures", _FIXTURES)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_tiny_model(folder, "bert", "embedding", **options)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_tiny_model(tmp_path_factory.mktemp("tiny-model") / "bert")


@pytest.fixture(scope="module")
def quick_yaml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Little data and no recovery, so each run takes seconds on a tiny model."""
    path = tmp_path_factory.mktemp("config") / "optimize.yaml"
    path.write_text(yaml.safe_dump({
        "quality_floor": None,
        "prune": {"data": {"max_examples": 40, "batch_size": 16},
                  "recovery": {"least_squares": False, "refit_ffn": False, "distill_steps": 0}},
        "validate": {"latency_shapes": [[1, 8]], "warmup": 0, "repeats": 1},
    }))
    return path


def _run_cli(args: Sequence[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PRUNESERVE_LOG_LEVEL": "WARNING"}
    return subprocess.run([sys.executable, "-m", "pruneserve.cli", *args], capture_output=True, text=True,
                          env=env, timeout=600, check=False)


def test_optimize_writes_an_artifact_a_session_answers_from(tiny_model: Path, quick_yaml: Path,
                                                            tmp_path: Path) -> None:
    import onnxruntime as ort
    from tokenizers import Tokenizer

    out = tmp_path / "artifact"
    proc = _run_cli(["optimize", "--model", str(tiny_model), "--config", str(quick_yaml), "--heads", "0.25",
                     "--with-reference", "--no-baselines", "--no-progress", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote {out}" in proc.stdout and "quality (" in proc.stdout
    artifact = load_artifact(out)
    m = artifact.manifest
    assert sum(m.pruning["kept_heads_per_layer"]) == 9  # --heads 0.25 of 12 overrides the preset's 0.5
    assert m.config["prune"]["budget"]["head_fraction"] == 0.25
    assert m.config["prune"]["recovery"]["least_squares"] is False  # from --config
    assert m.reference_file == "reference.onnx" and "reference.onnx" in m.files
    assert {"report.md", "optimize.yaml", "pruning.json", "latency.png"} <= set(m.files)

    tok = Tokenizer.from_file(str(artifact.tokenizer_path))
    tok.enable_padding()
    enc = tok.encode_batch(["a pruned encoder answers", "hello"])
    feeds = {"input_ids": np.array([e.ids for e in enc], dtype=np.int64),
             "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
             "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64)}
    session = ort.InferenceSession(str(artifact.model_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == m.inputs
    (embedding,) = session.run(m.output_names, feeds)
    assert embedding.shape == (2, m.outputs[0].dims[0])
    assert np.allclose(np.linalg.norm(embedding, axis=1), 1.0, atol=1e-3)  # normalised inside the graph

    # The saved optimize.yaml repeats the run's settings.
    again = tmp_path / "again"
    assert main(["optimize", "--config", str(out / "optimize.yaml"), "--no-progress", "--no-baselines",
                 "--out", str(again)]) == 0
    assert load_artifact(again).manifest.pruning["kept_heads_per_layer"] == m.pruning["kept_heads_per_layer"]


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--heads", "1.5"], "head_fraction=1.5"),
        (["--quantize", "dynamic", "--target", "tensorrt"], "TensorRT"),
        (["--quantize", "fp16"], "fp16"),
        (["--data", "/nonexistent/traffic.jsonl"], "traffic.jsonl"),
        (["--calibration-size", "0"], "calibration_size"),
    ],
)
def test_user_errors_exit_2_and_write_nothing(tiny_model: Path, quick_yaml: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str], extra: list[str],
                                              fragment: str) -> None:
    out = tmp_path / "out"
    code = main(["optimize", "--model", str(tiny_model), "--config", str(quick_yaml), "--no-progress",
                 *extra, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("error: ") and fragment in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_missing_model_folder_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["optimize", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "no-model" in err and "does not exist" in err
    assert [p.name for p in tmp_path.iterdir()] == []


def test_bad_config_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("quantise: {mode: dynamic}\n")
    code = main(["optimize", "--config", str(config), "--out", str(tmp_path / "out")])
    assert code == 2 and "quantise" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["bad.yaml"]


def test_existing_out_is_kept_without_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert main(["optimize", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_unreachable_quality_floor_exits_2_after_trying(tiny_model: Path, quick_yaml: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code = main(["optimize", "--model", str(tiny_model), "--config", str(quick_yaml), "--no-progress",
                 "--no-baselines", "--quantize", "none", "--heads", "0.5", "--out", str(out)]
                + ["--name", "tiny"])
    assert code == 0  # the same run without a floor succeeds ...
    out2 = tmp_path / "out2"
    floor_yaml = tmp_path / "floor.yaml"
    raw = yaml.safe_load(quick_yaml.read_text())
    raw["quality_floor"] = 0.9999999  # ... and with a floor pruning 50% of heads cannot meet, fails
    floor_yaml.write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    code = main(["optimize", "--model", str(tiny_model), "--config", str(floor_yaml), "--no-progress",
                 "--no-baselines", "--quantize", "none", "--heads", "0.5", "--out", str(out2)])
    err = capsys.readouterr().err
    assert code == 2
    assert "0.9999999" in err and "quality floor" in err and "--quality-floor" in err
    assert not out2.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["floor.yaml", "out"]


# -- issue 17: config merges, stages that connect, interrupts and logs -------------------------------------


def _config(argv: Sequence[str]):  # noqa: ANN202 - an OptimizeConfig
    from pruneserve.cli import build_parser
    from pruneserve.optimizer.commands_optimize import build_optimize_config

    return build_optimize_config(build_parser().parse_args(["optimize", *argv]))


def test_a_preset_keeps_the_yaml_prune_section(quick_yaml: Path, tmp_path: Path) -> None:
    config = _config(["--config", str(quick_yaml), "--preset", "aggressive", "--out", str(tmp_path / "o")])
    assert config.preset == "aggressive"
    recovery = config.prune.recovery  # the YAML's, over the preset's 300 distillation steps
    assert (recovery.least_squares, recovery.refit_ffn, recovery.distill_steps) == (False, False, 0)
    assert config.prune.data.max_examples == 40 and config.prune.data.batch_size == 16
    assert (config.prune.budget.head_fraction, config.prune.budget.ffn_fraction) == (0.5, 0.25)  # the preset's
    assert config.to_dict()["prune"]["recovery"]["distill_steps"] == 0  # what the artifact records


def test_preset_then_yaml_then_flags_field_by_field(tmp_path: Path) -> None:
    settings = tmp_path / "optimize.yaml"
    settings.write_text(yaml.safe_dump({"prune": {"budget": {"head_fraction": 0.25}},
                                        "quantize": {"calibration_size": 64}, "validate": {"repeats": 3}}))
    config = _config(["--preset", "aggressive", "--config", str(settings), "--ffn", "0.1", "--quantize", "static",
                      "--int8-method", "ort", "--no-baselines", "--out", str(tmp_path / "o")])
    assert (config.prune.budget.head_fraction, config.prune.budget.ffn_fraction) == (0.25, 0.1)
    assert config.prune.recovery.distill_steps == 300  # the preset's, named by neither
    q = config.quantize
    assert (q.mode, q.calibration_size, q.static_method) == ("static", 64, "ort")
    assert (config.validate.repeats, config.validate.baselines) == (3, False)


def test_paths_resolve_and_the_saved_yaml_works_from_anywhere(tiny_model: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    project = tmp_path / "project"
    (project / "settings").mkdir(parents=True)
    (project / "texts.txt").write_text("one text\nanother text\n")
    (project / "settings" / "quick.yaml").write_text(yaml.safe_dump(
        {"model": str(tiny_model), "prune": {"data": {"path": "../texts.txt"}}}))
    monkeypatch.chdir(project)
    # Paths in the YAML are relative to its folder, paths given as flags to the current one.
    config = _config(["--config", "settings/quick.yaml", "--out", "artifacts/a"])
    assert config.prune.data.path == str(project / "texts.txt")
    assert config.out == str(project / "artifacts" / "a") and config.model == str(tiny_model)
    flagged = _config(["--model", "model-dir", "--data", "texts.txt", "--out", "o"])
    assert (flagged.model, flagged.prune.data.path) == (str(project / "model-dir"), str(project / "texts.txt"))
    # The saved optimize.yaml holds absolute paths: --config reads the same run from another folder.
    saved = project / "settings" / "saved.yaml"
    saved.write_text(config.to_yaml())
    monkeypatch.chdir(tmp_path)
    again = _config(["--config", str(saved), "--out", "elsewhere"])
    assert (again.model, again.prune.data.path) == (config.model, config.prune.data.path)
    assert again.out == str(tmp_path / "elsewhere")


def test_a_refused_flag_value_names_the_flag(tiny_model: Path, quick_yaml: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["optimize", "--model", str(tiny_model), "--config", str(quick_yaml), "--heads", "1.5",
                 "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("error: --heads 1.5: budget.head_fraction=1.5 is outside")
    assert main(["optimize", "--model", str(tiny_model), "--quality-floor", "1.5", "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("error: --quality-floor 1.5: ")


def test_model_given_as_its_config_json_fails_in_the_preflight(tiny_model: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import pruneserve.optimizer.adapters as adapters

    monkeypatch.setattr(adapters, "load_model", lambda *a, **k: pytest.fail("the preflight should refuse first"))
    code = main(["optimize", "--model", str(tiny_model / "config.json"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and f"pass the folder that holds config.json: {tiny_model}/" in err, err
    assert list(tmp_path.iterdir()) == []


def test_progress_bars_only_on_a_terminal(tiny_model: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import pruneserve.optimizer.pipeline as pipeline

    seen: list[bool] = []

    def record_progress(config: object, progress: bool = True) -> None:
        seen.append(progress)
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run_optimize", record_progress)
    argv = ["optimize", "--model", str(tiny_model), "--out", str(tmp_path / "out")]
    assert main(argv) == 130  # under pytest, stderr is no terminal
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(argv) == 130 and main([*argv, "--no-progress"]) == 130
    assert seen == [False, True, False]


def test_ctrl_c_prints_one_line_exits_130_and_leaves_nothing(tiny_model: Path, quick_yaml: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    import pruneserve.artifact as artifact_module

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    real_copy = artifact_module.shutil.copyfile
    copies: list[object] = []

    def copy_then_interrupt(src: object, dst: object) -> object:
        copies.append(dst)
        if len(copies) == 2:  # the artifact half-assembled in its hidden sibling of --out
            raise KeyboardInterrupt
        return real_copy(src, dst)

    monkeypatch.setattr(artifact_module.shutil, "copyfile", copy_then_interrupt)
    out = tmp_path / "artifacts" / "out"
    code = main(["optimize", "--model", str(tiny_model), "--config", str(quick_yaml), "--quantize", "none",
                 "--no-baselines", "--out", str(out)])
    assert code == 130 and len(copies) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"interrupted; nothing was written to {out}"]
    assert not out.exists() and list(out.parent.iterdir()) == []  # no .out.partial-* left beside it
    assert list(scratch.iterdir()) == []  # the scratch folder went too


@pytest.fixture(scope="module")
def pruned_dir(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pruneserve prune``'s output on the data settings of ``quick_yaml`` (the bundled corpus)."""
    out = tmp_path_factory.mktemp("pruned") / "pruned"
    assert main(["prune", "--model", str(tiny_model), "--max-examples", "40", "--batch-size", "16", "--heads", "0.5",
                 "--distill-steps", "3", "--no-progress", "--out", str(out)]) == 0
    return out


def test_optimize_from_pruned_keeps_the_pruning_record(pruned_dir: Path, quick_yaml: Path, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    import json

    from pruneserve.optimizer.checkpoint import load_pruned

    encoder, document = load_pruned(pruned_dir)
    record = document["record"]
    out = tmp_path / "artifact"
    # No --model: the original is the source pruning.json records.
    code = main(["optimize", "--from-pruned", str(pruned_dir), "--config", str(quick_yaml), "--quantize", "none",
                 "--no-baselines", "--no-progress", "--out", str(out)])
    assert code == 0
    m = load_artifact(out).manifest
    assert m.pruning["kept_head_indices"] == record["kept_heads"]
    assert m.pruning["ffn_sizes_per_layer"] == record["ffn_per_layer"]
    assert m.pruning["params"] == record["params"] and m.pruning["from_checkpoint"] == str(pruned_dir)
    assert [s["method"] for s in m.pruning["recovery"]] == ["pruned", "refit", "distillation"]
    assert m.config["from_pruned"] == str(pruned_dir) and m.config["model"] == record["source_path"]
    assert m.config["prune"]["recovery"]["distill_steps"] == 3  # the checkpoint's, not the YAML's
    stages = m.quality["stages"]
    assert stages["pruned"]["score"] == pytest.approx(record["quality"]["before_recovery"]["score"])
    assert stages["recovered"]["score"] == pytest.approx(record["quality"]["after_recovery"]["score"])
    carried = json.loads((out / "pruning.json").read_text())
    for key in ("kept_heads", "quality", "search_trace", "importance", "source_sha256"):
        assert carried[key] == record[key], key
    # The same data settings: the checkpoint measures here as its record says.
    assert "differs from its record" not in caplog.text
    assert "from_checkpoint" in carried and sum(encoder.spec.heads) == 6


def test_optimize_from_pruned_refuses_another_model_and_shaping_flags(
    pruned_dir: Path, quick_yaml: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = _write_tiny_model(tmp_path / "other", seed=1)  # the same architecture, other weights
    out = tmp_path / "out"
    for argv, needle in (
        (["--from-pruned", str(pruned_dir), "--model", str(other)], "was pruned from"),
        (["--from-pruned", str(pruned_dir), "--heads", "0.25", "--preset", "light"], "--preset, --heads cannot change"),
        (["--from-pruned", str(other)], "has no pruning.json"),
        (["--model", str(pruned_dir)], "--from-pruned"),
    ):
        code = main(["optimize", "--config", str(quick_yaml), "--no-progress", *argv, "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and needle in err and "Traceback" not in err, (argv, err)
        assert not out.exists()


def test_pooling_flags_reach_the_checkpoint_and_the_artifact(tiny_model: Path, quick_yaml: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from pruneserve.optimizer.checkpoint import read_pruning_document

    pruned = tmp_path / "pruned"
    assert main(["prune", "--model", str(tiny_model), "--max-examples", "40", "--batch-size", "16", "--heads", "0.25",
                 "--no-recovery", "--pooling", "cls", "--normalize", "--no-progress", "--out", str(pruned)]) == 0
    spec = read_pruning_document(pruned)["spec"]
    assert (spec["pooling"], spec["normalize"]) == ("cls", True)
    # The student pools as it was recovered: the teacher follows it, and a contrary flag is refused.
    out = tmp_path / "artifact"
    refused = main(["optimize", "--from-pruned", str(pruned), "--config", str(quick_yaml), "--pooling", "mean",
                    "--quantize", "none", "--no-baselines", "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err
    assert refused == 2 and "recovered with pooling 'cls'" in err and not out.exists()
    assert main(["optimize", "--from-pruned", str(pruned), "--config", str(quick_yaml), "--quantize", "none",
                 "--no-baselines", "--no-progress", "--out", str(out)]) == 0
    m = load_artifact(out).manifest
    assert (m.pooling, m.normalize) == ("cls", True)
    assert (m.config["pooling"], m.config["normalize"]) == ("cls", True)
    import onnxruntime as ort

    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {i.name: np.ones((2, 5), dtype=np.int64) for i in session.get_inputs()}
    embedding = session.run(None, feeds)[0]
    assert np.allclose(np.linalg.norm(embedding, axis=1), 1.0, atol=1e-4)
