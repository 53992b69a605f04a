"""Nothing outside a pruneserve output is ever deleted, and an output that cannot be written fails first.

``pruneserve.outputs`` decides where a command may write: never the current directory or a
folder above it, the home folder, an existing file, or anything that is, holds or lies inside
an input (``--model``, ``--data``); a non-empty folder only with ``--overwrite`` and only when
pruneserve wrote it as the same kind of output, holding nothing else. Writability and free
space are tried in the preflight. Each case runs ``pruneserve score|prune|optimize`` in process
(``pruneserve.cli.main``) with model loading made to fail the test: every refusal must come
before any model loads, as one ``error:`` line with exit status 2, with every file still there.
No case depends on file permissions (the suite may run as root) or on timing.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from pruneserve import outputs
from pruneserve.artifact import ArtifactError, load_artifact, read_manifest, write_artifact
from pruneserve.cli import EXIT_INTERRUPTED, main
from pruneserve.outputs import OutputError, atomic_output_dir, check_capture_file, check_output_dir

COMMANDS = ("score", "prune", "optimize")
_FIXTURES = Path(__file__).resolve().parents[1] / "optimizer" / "conftest.py"
TEXTS = [f"sentence number {i} about pruning encoders and serving them fast" for i in range(48)]


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
def texts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "texts.txt"
    path.write_text("\n".join(TEXTS) + "\n")
    return path


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a model fails the test: a refusal must come before any work."""
    from pruneserve.optimizer import adapters

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(adapters, "load_model", fail)


def _argv(command: str, model: Path, data: Path) -> list[str]:
    argv = [command, "--model", str(model), "--data", str(data), "--no-progress"]
    return argv + (["--no-baselines"] if command == "optimize" else [])


def _refused(capsys: pytest.CaptureFixture[str], argv: list[str], *needles: str) -> str:
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


# -- the rules, through every command ------------------------------------------------------------
@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model: Path, texts: Path) -> Path:
    """A user's project folder, the current directory, holding its own files and a copy of the inputs."""
    root = tmp_path / "project"
    (root / "src").mkdir(parents=True)
    (root / "README.md").write_text("my project")
    (root / "src" / "main.py").write_text("print('hello')")
    shutil.copytree(tiny_model, root / "inputs" / "model")
    shutil.copy(texts, root / "inputs" / "texts.txt")
    monkeypatch.chdir(root)
    return root


CASES: dict[str, tuple[Callable[[Path], list[str]], tuple[str, ...]]] = {
    "current directory": (lambda p: ["--out", "."], ("is the current directory",)),
    "empty --out": (lambda p: ["--out", ""], ("is the current directory",)),
    "parent of the current directory": (lambda p: ["--out", ".."], ("a folder above the current directory",)),
    "root": (lambda p: ["--out", "/"], ("a folder above the current directory",)),
    "--out is --model": (lambda p: ["--out", "inputs/model"], ("is the --model path",)),
    "--out inside --model": (lambda p: ["--out", "inputs/model/out"], ("is inside the --model path",)),
    "--out is the --data file": (lambda p: ["--out", "inputs/texts.txt"], ("is the --data path",)),
    "--out holds the inputs": (lambda p: ["--out", "inputs"], ("contains the --model path",)),
    "non-empty folder that is no output": (lambda p: ["--out", "src"], ("is not a", "even with --overwrite")),
    "under a regular file": (lambda p: ["--out", "README.md/out"], ("is a file, not a folder",)),
    "/proc": (lambda p: ["--out", "/proc/pruneserve-out"], ("cannot be written", "/proc")),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("command", COMMANDS)
def test_unsafe_out_is_refused_before_any_work(
    command: str, case: str, project: Path, capsys: pytest.CaptureFixture[str], no_model_load: None
) -> None:
    extra, needles = CASES[case]
    before = _snapshot(project)
    argv = [*_argv(command, project / "inputs" / "model", project / "inputs" / "texts.txt"), *extra(project)]
    _refused(capsys, [*argv, "--overwrite"], *needles)
    assert _snapshot(project) == before, "a refused command changed the project folder"


@pytest.mark.parametrize("command", COMMANDS)
def test_home_folder_is_refused(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model: Path, texts: Path,
    capsys: pytest.CaptureFixture[str], no_model_load: None,
) -> None:
    home = tmp_path / "home"
    (home / "notes").mkdir(parents=True)
    (home / "notes" / "todo.txt").write_text("keep me")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    _refused(capsys, [*_argv(command, tiny_model, texts), "--out", "~", "--overwrite"], "is your home folder")
    _refused(capsys, [*_argv(command, tiny_model, texts), "--out", str(home), "--overwrite"], "is your home folder")
    assert (home / "notes" / "todo.txt").read_text() == "keep me"


@pytest.mark.parametrize("command", COMMANDS)
def test_too_little_free_space_is_refused_with_the_numbers(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model: Path, texts: Path,
    capsys: pytest.CaptureFixture[str], no_model_load: None,
) -> None:
    real = shutil.disk_usage

    def nearly_full(path: object) -> object:
        usage = real(path)  # type: ignore[arg-type]
        return type(usage)(usage.total, usage.total - 1024, 1024)

    monkeypatch.setattr(outputs.shutil, "disk_usage", nearly_full)
    out = tmp_path / "runs" / "out"
    _refused(capsys, [*_argv(command, tiny_model, texts), "--out", str(out)], "needs about", "has 0.0 MiB")
    assert not out.exists() and not (tmp_path / "runs").exists()


def test_an_existing_output_of_another_kind_is_not_replaced(
    tmp_path: Path, tiny_model: Path, texts: Path, embedding_artifact: Path, capsys: pytest.CaptureFixture[str],
    no_model_load: None,
) -> None:
    """An artifact is not a pruned checkpoint: `prune --overwrite` may not replace it, nor `score`."""
    out = shutil.copytree(embedding_artifact, tmp_path / "artifact")
    before = _snapshot(out)
    for command in ("score", "prune"):
        _refused(capsys, [*_argv(command, tiny_model, texts), "--out", str(out), "--overwrite"], "is not a")
    assert _snapshot(out) == before


# -- what may be replaced --------------------------------------------------------------------------
def test_score_replaces_only_its_own_output_and_writes_it_whole(
    tmp_path: Path, tiny_model: Path, texts: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "scores"
    argv = [*_argv("score", tiny_model, texts), "--max-length", "16", "--out", str(out)]
    assert main(argv) == 0
    first = json.loads((out / "importance.json").read_text())
    assert (out / "importance.png").is_file()
    capsys.readouterr()
    _refused(capsys, argv, "already exists", "--overwrite")  # an output of its own kind, but no --overwrite
    assert main([*argv, "--overwrite", "--method", "fisher"]) == 0
    assert json.loads((out / "importance.json").read_text())["method"] == "fisher" != first["method"]

    # Ctrl-C while writing: the previous scores stay, whole, and no partial folder is left beside them.
    from pruneserve.optimizer import plots

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(plots, "importance_heatmap", interrupted)
    before = _snapshot(out)
    assert main([*argv, "--overwrite"]) == EXIT_INTERRUPTED
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores"]

    # A file a person put there is not the score command's to delete.
    (out / "my-notes.txt").write_text("analysis")
    monkeypatch.undo()
    capsys.readouterr()
    _refused(capsys, [*argv, "--overwrite"], "my-notes.txt", "did not write")
    assert (out / "my-notes.txt").read_text() == "analysis"


def test_prune_replaces_its_own_checkpoint_and_never_a_model_folder(
    tmp_path: Path, tiny_model: Path, texts: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pruneserve.optimizer.checkpoint import load_pruned, save_pruned
    from pruneserve.optimizer.errors import CheckpointError

    out = tmp_path / "pruned"
    argv = [*_argv("prune", tiny_model, texts), "--max-length", "16", "--no-recovery", "--out", str(out)]
    assert main([*argv, "--heads", "0.25"]) == 0
    assert sum(load_pruned(out)[0].spec.heads) == 9
    assert main([*argv, "--heads", "0.5", "--overwrite"]) == 0
    encoder, _ = load_pruned(out)
    assert sum(encoder.spec.heads) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]  # no partial or old folder left

    # Called directly, the checkpoint writer still never writes into a model folder.
    model = shutil.copytree(tiny_model, tmp_path / "model")
    before = _snapshot(model)
    with pytest.raises(CheckpointError, match="is not a pruned checkpoint"):
        save_pruned(encoder, model)
    assert _snapshot(model) == before


def test_write_artifact_replaces_only_an_artifact(embedding_artifact: Path, tmp_path: Path) -> None:
    sources = {name: embedding_artifact / name for name in ("model.onnx", "tokenizer.json")}
    manifest = read_manifest(embedding_artifact)

    replaced = shutil.copytree(embedding_artifact, tmp_path / "artifact")
    manifest.version = 3
    write_artifact(replaced, manifest, sources, overwrite=True)
    assert load_artifact(replaced).manifest.version == 3

    empty = tmp_path / "empty"
    empty.mkdir()
    write_artifact(empty, manifest, sources)  # an empty folder needs no --overwrite
    load_artifact(empty)

    project = tmp_path / "project"
    project.mkdir()
    (project / "data.csv").write_text("a,b\n")
    with pytest.raises(OutputError, match="is not a pruneserve artifact"):
        write_artifact(project, manifest, sources, overwrite=True)
    assert _snapshot(project) == {"data.csv": b"a,b\n"}

    (replaced / "extra.txt").write_text("mine")
    with pytest.raises(OutputError, match="'extra.txt'"):
        write_artifact(replaced, manifest, sources, overwrite=True)
    assert (replaced / "extra.txt").read_text() == "mine"
    assert issubclass(OutputError, ArtifactError)  # the optimize CLI prints it as one error: line


def test_atomic_output_dir_checks_again_before_replacing(tmp_path: Path) -> None:
    """The work inside may take minutes: a folder that changed meanwhile is still not replaced."""
    out = tmp_path / "scores"
    with atomic_output_dir(out, kind="scores") as staged:
        (staged / "importance.json").write_text(json.dumps({"heads": [], "ffn": []}))
    assert json.loads((out / outputs.MARKER_FILE).read_text()) == {"kind": "scores", "files": ["importance.json"]}
    with pytest.raises(OutputError, match="'late.txt'"):
        with atomic_output_dir(out, kind="scores", overwrite=True) as staged:
            (out / "late.txt").write_text("written while the work ran")
            (staged / "importance.json").write_text("{}")
    assert (out / "late.txt").is_file() and (out / "importance.json").read_text() != "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores"]


def test_check_output_dir_resolves_and_probes_without_leaving_anything(tmp_path: Path) -> None:
    out = check_output_dir(tmp_path / "a" / "b" / ".." / "c", overwrite=False, kind="artifact", expected_bytes=1)
    assert out == (tmp_path / "a" / "c").resolve()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OutputError, match="is empty, which means the current directory"):  # `--out "$UNSET"`
        check_output_dir("", overwrite=True, kind="pruned")
    (tmp_path / "own").mkdir()
    (tmp_path / "own" / "mount-point").mkdir()  # an empty folder someone made is theirs too
    with pytest.raises(OutputError, match="'mount-point/'"):
        check_output_dir(tmp_path / "own", overwrite=True, kind="scores")


# -- the server's capture file ---------------------------------------------------------------------
def test_capture_path_must_be_new_or_a_previous_capture(tmp_path: Path) -> None:
    from pruneserve.server.config import ServeConfig
    from pruneserve.server.errors import ConfigError
    from pruneserve.server.shadow import CaptureWriter

    config_file = tmp_path / "serve.yaml"
    config_file.write_text("grpc_port: 8001\nshadow_rate: 0.1\n")
    model = tmp_path / "model.onnx"
    model.write_bytes(b"\x08\x07binary graph")
    for victim in (config_file, model):
        before = victim.read_bytes()
        with pytest.raises(ConfigError, match="is not a capture file"):
            ServeConfig(capture_path=str(victim), shadow_rate=0.1)
        with pytest.raises(OutputError, match="is not a capture file"):
            CaptureWriter(victim, max_bytes=4096, backups=1)
        assert victim.read_bytes() == before

    capture = tmp_path / "drift.jsonl"
    capture.write_text('{"text": "an earlier capture"}\n{"text": "cut mid-wri')  # a crash mid-append
    ServeConfig(capture_path=str(capture), shadow_rate=0.1)
    (tmp_path / "drift.jsonl.1").write_text("rotated over by mistake? no: not a capture\n")
    with pytest.raises(ConfigError, match=r"drift\.jsonl\.1 exists and is not a capture file"):
        ServeConfig(capture_path=str(capture), shadow_rate=0.1, capture_backups=2)
    ServeConfig(capture_path=str(capture), shadow_rate=0.1, capture_backups=0)  # .1 is never touched then
    (tmp_path / "empty.jsonl").write_text("")
    assert check_capture_file(tmp_path / "empty.jsonl", backups=2) == tmp_path / "empty.jsonl"
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_capture_file(config_file / "drift.jsonl", backups=0)


# -- benchmark outputs -----------------------------------------------------------------------------
def test_benchmark_results_go_only_to_a_results_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.__main__ import main as bench_main
    from benchmarks._common import BenchConfig, BenchmarkError

    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.md").write_text("mine")
    with pytest.raises(BenchmarkError, match="is not a benchmark results folder"):
        BenchConfig(out_dir=project)
    assert bench_main(["--quick", "--out", str(project), "--no-markdown"]) == 2
    assert "error: " in capsys.readouterr().err
    assert _snapshot(project) == {"notes.md": b"mine"}
    earlier = tmp_path / "results"
    earlier.mkdir()
    (earlier / "machine.json").write_text("{}")
    (earlier / "server.csv").write_text("rows")
    BenchConfig(out_dir=earlier)  # a folder the harness wrote is updated in place
    partial = tmp_path / "partial"  # a run with --only server writes no machine.json, but marks the folder
    partial.mkdir()
    (partial / "server.csv").write_text("rows")
    with pytest.raises(BenchmarkError):
        BenchConfig(out_dir=partial)
    outputs.mark_output_dir(partial, "results")
    BenchConfig(out_dir=partial)


def test_benchmark_cache_never_deletes_a_folder_it_did_not_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import benchmarks.model as bench_model
    from benchmarks._common import BenchConfig

    def no_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("optimize ran over a folder the harness did not build")

    monkeypatch.setattr(bench_model, "run_optimize", no_build)
    cache = tmp_path / "cache"
    (cache / "light").mkdir(parents=True)
    (cache / "light" / "thesis.tex").write_text("years of work")
    cfg = BenchConfig(out_dir=tmp_path / "results", artifact_cache=cache, presets=("light",))
    artifacts, notes = bench_model.build_artifacts(cfg)
    assert artifacts == {} and any("is not a pruneserve artifact" in n for n in notes), notes
    assert (cache / "light" / "thesis.tex").read_text() == "years of work"
