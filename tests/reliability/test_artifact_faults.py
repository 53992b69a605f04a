"""Interrupted artifact writes: never a half-written artifact under the final name.

``write_artifact`` (what ``pruneserve optimize`` ends with) assembles the folder in a hidden
sibling and renames it into place. These tests interrupt it for real: a writer process is
SIGKILLed in the middle of copying (no cleanup code can run), and an in-process write is
interrupted by KeyboardInterrupt (Ctrl-C). Afterwards ``--out`` is absent or still holds the
previous, verifiable artifact, and a server pointed at it serves the good models it was given.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tiny_artifacts import text_request

from pruneserve import artifact as artifact_module
from pruneserve.artifact import ArtifactNotFoundError, load_artifact, read_manifest, write_artifact
from pruneserve.server.config import ServeConfig
from pruneserve.server.dataplane import DataPlane

# Copies the first file, announces it, then hangs inside write_artifact until killed.
_WRITER = textwrap.dedent(
    """
    import shutil, sys, time
    from pathlib import Path
    from pruneserve.artifact import read_manifest, write_artifact

    source, out, overwrite = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
    real_copy = shutil.copyfile

    def copy_then_hang(src, dst, **kwargs):
        result = real_copy(src, dst, **kwargs)
        print("COPIED", Path(dst).name, flush=True)
        time.sleep(600)
        return result

    shutil.copyfile = copy_then_hang
    manifest = read_manifest(source)
    manifest.version = 7
    sources = {name: source / name for name in ("model.onnx", "tokenizer.json")}
    write_artifact(out, manifest, sources, overwrite=overwrite)
    """
)


def _kill_mid_write(source: Path, out: Path, *, overwrite: bool) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(source), str(out), "1" if overwrite else "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("COPIED"), proc.stderr.read() if proc.stderr else line
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL


def _serve_names(paths: list[Path]) -> tuple[list[str], list[str]]:
    """Serve ``paths``; return the model names served and the load failures' reasons."""

    async def main() -> tuple[list[str], list[str]]:
        dp = DataPlane(ServeConfig(artifacts=[str(p) for p in paths], threads=1))
        await dp.start()
        try:
            for name in dp.model_names():
                response = await dp.infer(text_request(name, ["hello world"]))
                assert response.outputs[0].data.shape[0] == 1
            return dp.model_names(), [f.reason for f in dp.load_failures]
        finally:
            await dp.stop(1.0)

    return asyncio.run(main())


def test_writer_killed_mid_copy_leaves_no_artifact(embedding_artifact: Path, classifier_artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _kill_mid_write(embedding_artifact, out, overwrite=False)
    assert not out.exists()
    # What the kill left is a hidden work folder, never mistaken for the artifact.
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert all(name.startswith(f".{out.name}.partial-") for name in leftovers), leftovers
    with pytest.raises(ArtifactNotFoundError):
        load_artifact(out)
    names, failures = _serve_names([out, classifier_artifact])
    assert names == ["tiny-cls"] and len(failures) == 1


def test_overwrite_killed_mid_copy_keeps_the_previous_artifact(embedding_artifact: Path, tmp_path: Path) -> None:
    out = shutil.copytree(embedding_artifact, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _kill_mid_write(embedding_artifact, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert load_artifact(out, verify=True).manifest.version == 1  # the killed write would have made 7
    assert _serve_names([out]) == (["tiny-embed"], [])


@pytest.mark.parametrize("overwrite", [False, True], ids=["fresh", "overwrite"])
def test_ctrl_c_mid_write_cleans_up_and_leaves_out_untouched(
    embedding_artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overwrite: bool
) -> None:
    out = tmp_path / "out"
    if overwrite:
        shutil.copytree(embedding_artifact, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()} if overwrite else None
    real_copy = shutil.copyfile
    calls = 0

    def copy_then_interrupt(src: str, dst: str, **kwargs: object) -> str:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise KeyboardInterrupt
        return real_copy(src, dst, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(artifact_module.shutil, "copyfile", copy_then_interrupt)
    manifest = read_manifest(embedding_artifact)
    sources = {name: embedding_artifact / name for name in ("model.onnx", "tokenizer.json")}
    with pytest.raises(KeyboardInterrupt):
        write_artifact(out, manifest, sources, overwrite=overwrite)
    assert calls == 2
    assert sorted(os.listdir(tmp_path)) == (["out"] if overwrite else [])  # no partial folder left behind
    if overwrite:
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
        load_artifact(out, verify=True)


def test_existing_out_is_refused_without_overwrite(embedding_artifact: Path, tmp_path: Path) -> None:
    out = shutil.copytree(embedding_artifact, tmp_path / "out")
    sources = {name: embedding_artifact / name for name in ("model.onnx", "tokenizer.json")}
    with pytest.raises(artifact_module.ArtifactError, match="already exists; choose another --out or pass --overwrite"):
        write_artifact(out, read_manifest(embedding_artifact), sources)
    load_artifact(out, verify=True)
