"""An embedding artifact's pooling and normalisation: typed in the manifest (older manifests
without them still load) and shown in the served model config."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pruneserve.artifact import MANIFEST_NAME, Manifest, ManifestError, load_artifact
from pruneserve.server.config import ServeConfig
from pruneserve.server.dataplane import DataPlane
from pruneserve.server.servicer import encode_model_config

ArtifactFactory = Callable[..., Path]


def _manifest(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"name": "m", "task": "embedding", "inputs": ["input_ids", "attention_mask"],
                            "outputs": [{"name": "embedding", "dims": [8]}], "max_sequence_length": 16,
                            "schema_version": 1}
    return {**base, **fields}


def test_the_manifest_records_pooling_and_normalisation(artifact_factory: ArtifactFactory) -> None:
    path = artifact_factory(name="max-unit", pooling="max", normalize=True)
    on_disk = json.loads((path / MANIFEST_NAME).read_text(encoding="utf-8"))
    assert (on_disk["pooling"], on_disk["normalize"]) == ("max", True)
    manifest = load_artifact(path).manifest
    assert (manifest.pooling, manifest.normalize) == ("max", True)


def test_an_older_manifest_without_them_still_loads(artifact_factory: ArtifactFactory) -> None:
    path = artifact_factory(name="old")
    raw = json.loads((path / MANIFEST_NAME).read_text(encoding="utf-8"))
    del raw["pooling"], raw["normalize"]
    # manifest.json is not covered by its own sha256, so the rest of the artifact still verifies.
    (path / MANIFEST_NAME).write_text(json.dumps(raw), encoding="utf-8")
    manifest = load_artifact(path).manifest
    assert (manifest.pooling, manifest.normalize) == (None, None)
    assert Manifest.from_dict(_manifest()).pooling is None


@pytest.mark.parametrize(("fields", "message"), [
    ({"pooling": "sum"}, r"pooling 'sum' is not one of \('mean', 'cls', 'max'\)"),
    ({"pooling": 1}, r"manifest field 'pooling' is 1 \(int\); expected a string or null"),
    ({"normalize": "yes"}, r"manifest field 'normalize' is 'yes' \(str\); expected true, false or null"),
    ({"task": "classification", "labels": ["a"], "outputs": [{"name": "logits", "dims": [1]}], "pooling": "cls"},
     r"a classification model has no pooling or normalisation"),
    ({"task": "classification", "labels": ["a"], "outputs": [{"name": "logits", "dims": [1]}], "normalize": False},
     r"a classification model has no pooling or normalisation"),
])
def test_bad_values_are_refused_by_name(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        Manifest.from_dict(_manifest(**fields))


def test_the_served_model_config_shows_them(artifact_factory: ArtifactFactory, classifier_artifact: Path,
                                            run_dataplane) -> None:
    artifacts = [artifact_factory(name="cls-raw", pooling="cls", normalize=False),
                 artifact_factory(name="mean-unit"), artifact_factory(name="unrecorded", pooling=None),
                 classifier_artifact]
    config = ServeConfig(artifacts=[str(a) for a in artifacts], grpc_port=0, http_port=0, metrics_port=0,
                         host="127.0.0.1", metrics_host="127.0.0.1", threads=1, workers=1)

    async def scenario(dp: DataPlane) -> None:
        cls_raw = dp.model_config("cls-raw").parameters
        assert (cls_raw["pooling"], cls_raw["normalize"]) == ("cls", "false")
        mean_unit = encode_model_config(dp.model_config("mean-unit"))  # what Triton's ModelConfig carries
        assert mean_unit.parameters["pooling"].string_value == "mean"
        assert mean_unit.parameters["normalize"].string_value == "true"
        for name in ("unrecorded", "tiny-cls"):  # nothing claimed where nothing is known (or meant)
            assert not {"pooling", "normalize"} & set(dp.model_config(name).parameters), name

    run_dataplane(config, scenario)
