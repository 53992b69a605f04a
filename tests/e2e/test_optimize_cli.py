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


def _write_tiny_model(folder: Path) -> Path:
    # tests/ folders are not packages: load the optimizer tests' model writer by path.
    spec = importlib.util.spec_from_file_location("optimizer_test_fixtures", _FIXTURES)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_tiny_model(folder, "bert", "embedding")


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
