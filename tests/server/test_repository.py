"""The repository verifies every artifact, refuses bad ones by name, and keeps serving good ones."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from tiny_artifacts import text_request

from pruneserve.server.config import ServeConfig
from pruneserve.server.dataplane import DataPlane
from pruneserve.server.errors import ModelLoadError, NotFoundError
from pruneserve.server.metrics import Metrics
from pruneserve.server.repository import ModelRepository


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_manifest(path: Path, edit: Callable[[dict], None]) -> None:
    m = path / "manifest.json"
    data = json.loads(m.read_text())
    edit(data)
    m.write_text(json.dumps(data))


def _truncate_model(p: Path) -> None:
    data = (p / "model.onnx").read_bytes()
    (p / "model.onnx").write_bytes(data[: len(data) // 2])


def _flip_model_byte(p: Path) -> None:
    data = bytearray((p / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the sha256 can tell
    (p / "model.onnx").write_bytes(bytes(data))


def _alter_tokenizer(p: Path) -> None:
    tok = json.loads((p / "tokenizer.json").read_text())
    tok["model"]["vocab"]["evil"] = 0
    (p / "tokenizer.json").write_text(json.dumps(tok))


def _alter_manifest_hash(p: Path) -> None:
    _edit_manifest(p, lambda d: d["files"]["tokenizer.json"].update(sha256="0" * 64))


def _unknown_schema(p: Path) -> None:
    _edit_manifest(p, lambda d: d.update(schema_version=99))


def _unknown_field(p: Path) -> None:
    _edit_manifest(p, lambda d: d.update(pickle_payload="x"))


def _model_outside(p: Path) -> None:
    outside = p.parent / f"{p.name}-outside.onnx"
    shutil.copyfile(p / "model.onnx", outside)
    _edit_manifest(p, lambda d: d.update(model_file=f"../{outside.name}"))


def _symlink_outside(p: Path) -> None:
    outside = p.parent / f"{p.name}-outside.onnx"
    shutil.copyfile(p / "model.onnx", outside)
    (p / "model.onnx").unlink()
    (p / "model.onnx").symlink_to(outside)


def _not_json(p: Path) -> None:
    (p / "manifest.json").write_text("{not json")


def _missing_model(p: Path) -> None:
    (p / "model.onnx").unlink()


TAMPERINGS: dict[str, tuple[Callable[[Path], None], str, str]] = {
    # name: (tamper, failure reason, text the message must contain)
    "truncated model": (_truncate_model, "integrity", "truncated or replaced"),
    "altered model": (_flip_model_byte, "integrity", "sha256 of 'model.onnx'"),
    "altered tokenizer": (_alter_tokenizer, "integrity", "tokenizer.json"),
    "altered manifest hash": (_alter_manifest_hash, "integrity", "sha256 of 'tokenizer.json'"),
    "unknown schema": (_unknown_schema, "schema", "schema_version 99"),
    "unknown manifest field": (_unknown_field, "manifest", "pickle_payload"),
    "model outside the folder": (_model_outside, "integrity", "not a plain relative path"),
    "symlink outside the folder": (_symlink_outside, "integrity", "outside the artifact directory"),
    "manifest not json": (_not_json, "manifest", "not valid JSON"),
    "missing model": (_missing_model, "integrity", "missing"),
}


@pytest.mark.parametrize("case", sorted(TAMPERINGS))
def test_tampered_artifact_is_refused_while_good_ones_serve(
    case: str, embedding_artifact: Path, classifier_artifact: Path, tmp_path: Path, run_dataplane
) -> None:
    tamper, reason, text = TAMPERINGS[case]
    bad = _copy(classifier_artifact, tmp_path / "bad")
    tamper(bad)
    metrics = Metrics()
    config = ServeConfig(artifacts=[str(bad), str(embedding_artifact)], threads=1)

    async def scenario(dp: DataPlane) -> None:
        assert dp.model_names() == ["tiny-embed"]
        assert dp.ready() and dp.model_ready("tiny-embed") and not dp.model_ready("tiny-cls")
        [failure] = dp.load_failures
        assert failure.reason == reason
        assert text in failure.message
        response = await dp.infer(text_request("tiny-embed", ["hello world"]))
        assert response.outputs[0].data.shape == (1, 8)
        with pytest.raises(NotFoundError):
            await dp.infer(text_request("tiny-cls", ["hello world"]))

    run_dataplane(config, scenario, metrics)
    assert metrics.registry.get_sample_value("pruneserve_model_load_failures_total", {"reason": reason}) == 1


def test_unloadable_graph_with_valid_hashes_is_refused(artifact_factory, tmp_path: Path) -> None:
    good = artifact_factory(name="good")
    bad = artifact_factory(name="garbage")
    # Re-sign a garbage graph so only the engine can notice.
    (bad / "model.onnx").write_bytes(b"this is not an onnx graph")
    from pruneserve.artifact import read_manifest, write_artifact

    manifest = read_manifest(bad)
    resigned = write_artifact(
        tmp_path / "resigned", manifest, {"model.onnx": bad / "model.onnx", "tokenizer.json": bad / "tokenizer.json"}
    )
    repo = ModelRepository(ServeConfig(threads=1))
    failures = repo.load_all([resigned.path, good])
    assert [f.reason for f in failures] == ["engine"]
    assert "ONNX Runtime cannot load" in failures[0].message
    assert repo.names() == ["good"]


def test_manifest_that_disagrees_with_the_graph_is_refused_at_warm_up(artifact_factory) -> None:
    good = artifact_factory(name="good")
    bad = artifact_factory(name="wrong-dims")
    # The manifest is not hashed by itself: a hand-edited output shape must still be caught.
    _edit_manifest(bad, lambda d: d["outputs"][0].update(dims=[16]))
    repo = ModelRepository(ServeConfig(threads=1))
    failures = repo.load_all([bad, good])
    assert [f.reason for f in failures] == ["engine"]
    assert "output 'embedding' has shape [batch, 8] but the manifest declares [batch, 16]" in failures[0].message
    assert repo.names() == ["good"]
    repo.close()


def test_versions_latest_and_explicit(artifact_factory) -> None:
    v1 = artifact_factory(name="multi", version=1, seed=3)
    v2 = artifact_factory(name="multi", version=2, seed=4)
    repo = ModelRepository(ServeConfig(threads=1))
    assert repo.load_all([v2, v1]) == []
    assert repo.versions("multi") == ["1", "2"]
    assert repo.get("multi").version == "2"
    assert repo.get("multi", "1").version == "1"
    with pytest.raises(NotFoundError, match=r"no version '3'.*\['1', '2'\]"):
        repo.get("multi", "3")
    with pytest.raises(NotFoundError, match="available models"):
        repo.get("absent")
    repo.close()


def test_versions_serve_their_own_weights(artifact_factory, run_dataplane) -> None:
    v1 = artifact_factory(name="multi", version=1, seed=3)
    v2 = artifact_factory(name="multi", version=2, seed=4)

    async def scenario(dp: DataPlane) -> tuple[np.ndarray, np.ndarray, str]:
        latest = await dp.infer(text_request("multi", ["hello"]))
        first = await dp.infer(text_request("multi", ["hello"], version="1"))
        return latest.outputs[0].data, first.outputs[0].data, latest.version

    latest, first, version = run_dataplane(ServeConfig(artifacts=[str(v1), str(v2)], threads=1), scenario)
    assert version == "2"
    assert not np.allclose(latest, first)


def test_duplicate_name_and_version_is_refused(artifact_factory) -> None:
    a = artifact_factory(name="dup")
    b = artifact_factory(name="dup")
    repo = ModelRepository(ServeConfig(threads=1))
    repo.load(a)
    with pytest.raises(ModelLoadError, match="already served"):
        repo.load(b)
    repo.close()


def test_no_loadable_artifact_means_not_ready(tmp_path: Path, run_dataplane) -> None:
    async def scenario(dp: DataPlane) -> None:
        assert dp.live()
        assert not dp.ready()
        assert dp.model_names() == []

    run_dataplane(ServeConfig(artifacts=[str(tmp_path / "nothing")], threads=1), scenario)
