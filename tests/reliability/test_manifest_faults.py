"""Malformed manifests: every one refused (or harmlessly served) and the good model beside it always served.

``manifest.json`` is not covered by its own hash, so anything can be in it: wrong types, nulls,
NUL bytes in file names, a list where an object belongs. Loading a batch of artifacts must
never raise out of :meth:`ModelRepository.load_all`: one bad folder must not stop the server
from starting with the good ones (deliverable: refused at load while other models serve).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pruneserve.server.config import ServeConfig
from pruneserve.server.repository import ModelRepository

Edit = Callable[[dict[str, Any]], Any]


def _set(field: str, value: Any) -> Edit:
    def edit(m: dict[str, Any]) -> dict[str, Any]:
        m[field] = value
        return m

    return edit


def _file_entry(name: str, meta: Any) -> Edit:
    def edit(m: dict[str, Any]) -> dict[str, Any]:
        m["files"][name] = meta
        return m

    return edit


CASES: dict[str, Edit | tuple[Edit, pytest.MarkDecorator]] = {
    "whole manifest a list": lambda m: [m],
    "files a list": _set("files", []),
    "files null": _set("files", None),
    "file entry a string": _file_entry("model.onnx", "abc"),
    "file entry a number": _file_entry("model.onnx", 5),
    "file name with a NUL byte": _file_entry("a\u0000b", {"sha256": "0" * 64}),
    "file name absolute": _file_entry("/etc/passwd", {"sha256": "0" * 64}),
    "file name escaping": _file_entry("../../etc/passwd", {"sha256": "0" * 64}),
    "size a string": lambda m: m["files"]["model.onnx"].update(size="12") or m,
    "sha256 a number": lambda m: m["files"]["model.onnx"].update(sha256=5) or m,
    "outputs a string": _set("outputs", "embedding"),
    "output without dims": _set("outputs", [{"name": "embedding"}]),
    "output dims a string": _set("outputs", [{"name": "embedding", "dims": "8"}]),
    "output with an unknown key": _set("outputs", [{"name": "embedding", "dims": [8], "x": 1}]),
    "inputs a string": _set("inputs", "input_ids"),
    "inputs null": _set("inputs", None),
    "inputs numbers": _set("inputs", [1]),
    "name a number": _set("name", 5),
    "name a list": _set("name", ["a"]),
    "name with a slash": _set("name", "../evil"),
    "task a list": _set("task", ["embedding"]),
    "max length a float": _set("max_sequence_length", 24.0),
    "max length enormous": _set("max_sequence_length", 10**30),
    "model file a number": _set("model_file", 5),
    "model file with a NUL byte": _set("model_file", "model\u0000.onnx"),
    "model file the folder": _set("model_file", "."),
    "runtime a list": _set("runtime", ["x"]),
    "quantization a list": _set("quantization", [1]),
    "version a string": _set("version", "1"),
    "schema version a string": _set("schema_version", "1"),
    "schema version missing": lambda m: m.pop("schema_version") and m,
}


@pytest.fixture(scope="module")
def good(artifact_factory: Callable[..., Path]) -> Path:
    return artifact_factory(name="good")


@pytest.fixture(scope="module")
def base(artifact_factory: Callable[..., Path]) -> Path:
    return artifact_factory(name="bad", task="classification", seed=2)


def _params() -> list[Any]:
    out = []
    for name, case in sorted(CASES.items()):
        edit, marks = (case[0], [case[1]]) if isinstance(case, tuple) else (case, [])
        out.append(pytest.param(edit, id=name, marks=marks))
    return out


@pytest.mark.parametrize("edit", _params())
def test_malformed_manifest_is_refused_and_the_good_model_still_serves(
    edit: Edit, good: Path, base: Path, tmp_path: Path
) -> None:
    bad = Path(shutil.copytree(base, tmp_path / "bad"))
    manifest = json.loads((bad / "manifest.json").read_text())
    (bad / "manifest.json").write_text(json.dumps(edit(manifest)))
    repo = ModelRepository(ServeConfig(threads=1))
    try:
        failures = repo.load_all([bad, good])  # must not raise, whatever the manifest holds
        assert "good" in repo.names()
        assert [f.path for f in failures] == [str(bad)], failures
        assert str(bad) in failures[0].message and failures[0].reason in ("manifest", "schema", "integrity", "engine")
        assert repo.names() == ["good"]
    finally:
        repo.close()
