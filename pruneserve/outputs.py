"""Where a command may write: the one place that decides whether an output path is safe.

Every command that writes a folder (``optimize``'s artifact, ``prune``'s checkpoint,
``score``'s importance scores, the benchmark harness's results) asks
:func:`check_output_dir` first, before any work starts, and writes through
:func:`atomic_output_dir`, which assembles the folder in a hidden sibling and renames it into
place only when it is complete. The server's capture file is checked by
:func:`check_capture_file`. The rules, the same for every command:

* never written: the current directory or any folder above it (``--out ''`` and ``--out .``
  are the current directory), the home folder and its parents, an existing file, and any path
  that is, contains or lies inside one of the command's inputs (the ``--model`` folder, the
  ``--data`` file);
* a new or empty folder is always fine;
* a non-empty folder is replaced only with ``--overwrite``, only when pruneserve wrote it as
  an output of the same kind (an artifact whose manifest reads, a checkpoint or scores folder
  whose ``.pruneserve-output.json`` names its kind), and only when it holds nothing else;
* the nearest existing folder must accept a new entry (tried, not guessed from permission
  bits, so ``/proc/x`` or a read-only mount fail in milliseconds) and have room for the
  output's expected size.

A refusal raises :class:`OutputError` (an :class:`~pruneserve.artifact.ArtifactError`, which
the CLIs print as one ``error:`` line, exit 2) and touches nothing. Stdlib only: the server
imports this module.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pruneserve.artifact import MANIFEST_NAME, ArtifactError, read_manifest

__all__ = [
    "KINDS",
    "MARKER_FILE",
    "OutputError",
    "atomic_output_dir",
    "check_capture_file",
    "check_free_space",
    "check_output_dir",
    "mark_output_dir",
    "nearest_existing",
    "weights_bytes",
]

#: Written by :func:`atomic_output_dir` (and :func:`mark_output_dir`) into every output folder
#: that has no manifest of its own: the kind, and the files pruneserve put there.
MARKER_FILE = ".pruneserve-output.json"
#: The files a pruned checkpoint / scores folder held before :data:`MARKER_FILE` existed.
PRUNING_FILE = "pruning.json"
WEIGHTS_FILE = "model.safetensors"
IMPORTANCE_FILE = "importance.json"
_LEGACY_FILES: dict[str, frozenset[str]] = {
    "pruned": frozenset({PRUNING_FILE, WEIGHTS_FILE, "tokenizer.json", "importance.png", "tradeoff.png"}),
    "scores": frozenset({IMPORTANCE_FILE, "importance.png"}),
}
#: How much of an existing capture file is read to decide whether it is one.
_CAPTURE_SNIFF_BYTES = 64 * 1024
_MIB = 1 << 20


class OutputError(ArtifactError):
    """An output path may not be written (unsafe, occupied, unwritable or too little space)."""


@dataclass(frozen=True)
class _Kind:
    """One kind of output folder."""

    description: str
    #: Whether the folder is updated in place (results) rather than replaced as a whole.
    in_place: bool = False


#: Every kind of folder a pruneserve command writes.
KINDS: dict[str, _Kind] = {
    "artifact": _Kind("pruneserve artifact (a folder with a readable manifest.json)"),
    "pruned": _Kind("pruned checkpoint written by `pruneserve prune`"),
    "scores": _Kind("scores folder written by `pruneserve score`"),
    "results": _Kind("benchmark results folder written by `python -m benchmarks`", in_place=True),
}


# -- recognising what pruneserve wrote ----------------------------------------------------------
def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def _marker_files(folder: Path, kind: str) -> set[str] | None:
    """The files the marker lists, when it names ``kind``; None otherwise."""
    doc = _read_json(folder / MARKER_FILE)
    if not isinstance(doc, dict) or doc.get("kind") != kind:
        return None
    files = doc.get("files", [])
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    return {*files, MARKER_FILE}


def _is_pruned(folder: Path) -> bool:
    doc = _read_json(folder / PRUNING_FILE)
    return (
        isinstance(doc, dict) and isinstance(doc.get("format_version"), int) and isinstance(doc.get("spec"), dict)
        and (folder / WEIGHTS_FILE).is_file()
    )  # fmt: skip


def _is_scores(folder: Path) -> bool:
    doc = _read_json(folder / IMPORTANCE_FILE)
    return isinstance(doc, dict) and isinstance(doc.get("heads"), list) and isinstance(doc.get("ffn"), list)


def _owned_files(folder: Path, kind: str) -> set[str] | None:
    """The files of ``folder`` that pruneserve wrote as a ``kind`` output, or None if it is not one.

    Each kind's own record must parse as that kind (an artifact's manifest, a checkpoint's
    ``pruning.json`` beside its weights, the scores' ``importance.json``), not merely exist; the
    marker then says which files came with it (folders from before the marker: the files those
    commands wrote then).
    """
    if kind == "artifact":
        try:
            manifest = read_manifest(folder)
        except ArtifactError:
            return None
        return {*manifest.files, MANIFEST_NAME}
    marked = _marker_files(folder, kind)
    if kind == "results":  # updated in place: which files it holds does not matter
        return set() if marked is not None or isinstance(_read_json(folder / "machine.json"), dict) else None
    if not (_is_pruned(folder) if kind == "pruned" else _is_scores(folder)):
        return None
    return marked if marked is not None else set(_LEGACY_FILES[kind])


def _entries(folder: Path) -> list[str]:
    """Every file, symlink and empty folder under ``folder``, as relative POSIX paths, sorted.

    Empty folders count: a folder someone made there (a mount point, a place for results) is
    not pruneserve's to delete either.
    """
    found: list[str] = []
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        found += [(rel / d).as_posix() for d in dirs if (Path(root) / d).is_symlink()]
        found += [(rel / f).as_posix() for f in files]
        if not dirs and not files and rel != Path("."):
            found.append(rel.as_posix() + "/")
    return sorted(found)


# -- the checks ---------------------------------------------------------------------------------
def _size(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 30 else f"{n / _MIB:.1f} MiB"


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # e.g. EACCES on a folder we may not search: treat as there, the probe then fails
        return True


def nearest_existing(path: Path) -> Path:
    """``path`` itself if it exists, else its closest existing parent (``/`` at worst)."""
    while not _exists(path) and path != path.parent:
        path = path.parent
    return path


def _shown(raw: str | os.PathLike[str]) -> str:
    return repr(os.fspath(raw))


def _refuse_special(flag: str, raw: str | os.PathLike[str], out: Path) -> None:
    """The current directory, the folders above it, the home folder and the ones above it."""
    if os.fspath(raw).strip() == "":
        raise OutputError(
            f"{flag} is empty, which means the current directory ({Path.cwd()}) (an unset shell variable?); "
            f"give a new or empty folder, e.g. {flag} ./out"
        )
    cwd = Path.cwd().resolve()
    home = Path.home().resolve()
    if cwd.is_relative_to(out):
        what = "the current directory" if out == cwd else f"a folder above the current directory ({cwd})"
        raise OutputError(
            f"{flag} {_shown(raw)} is {what}; pruneserve writes a whole folder at {flag}: give a new or empty "
            f"folder, e.g. {flag} ./out"
        )
    if home.is_relative_to(out):
        what = "your home folder" if out == home else f"a folder above your home folder ({home})"
        raise OutputError(f"{flag} {_shown(raw)} is {what} ({out}); give a new or empty folder, e.g. {flag} ~/out")


def _refuse_inputs(flag: str, out: Path, inputs: Mapping[str, str | os.PathLike[str] | None]) -> None:
    for name, given in inputs.items():
        if given is None or os.fspath(given) == "":
            continue
        source = Path(given).expanduser().resolve()
        if out == source:
            relation = "is"
        elif out.is_relative_to(source):
            relation = "is inside"
        elif source.is_relative_to(out):
            relation = "contains"
        else:
            continue
        raise OutputError(
            f"{flag} {out} {relation} the {name} path {source}; an output must never touch an input: "
            f"give a folder that neither holds nor lies inside {source}"
        )


def check_free_space(path: str | os.PathLike[str], need: int, *, what: str, flag: str = "--out") -> None:
    """Refuse when the file system holding ``path`` (or its nearest existing parent) has under ``need`` bytes free."""
    where = nearest_existing(Path(path).expanduser().resolve())
    try:
        free = shutil.disk_usage(where).free
    except OSError as exc:
        raise OutputError(f"{flag} {path}: cannot read the free space of {where} ({exc.strerror or exc})") from None
    if free < need:
        raise OutputError(
            f"{flag} {path}: {what} needs about {_size(need)} free but {where} has {_size(free)}; free some space "
            f"or choose a folder on another disk"
        )


def _probe_writable(flag: str, out: Path) -> None:
    """Create and remove an entry in the nearest existing folder of ``out.parent``."""
    where = nearest_existing(out.parent)
    if not where.is_dir():
        raise OutputError(f"{flag} {out} cannot be created: {where} is a file, not a folder; choose another path")
    try:
        probe = tempfile.mkdtemp(prefix=".pruneserve-probe-", dir=where)
        os.rmdir(probe)
    except OSError as exc:
        raise OutputError(
            f"{flag} {out} cannot be written: creating an entry in {where} failed ({exc.strerror or exc}); "
            "choose a writable folder"
        ) from None


def check_output_dir(
    path: str | os.PathLike[str],
    *,
    overwrite: bool,
    kind: str,
    inputs: Mapping[str, str | os.PathLike[str] | None] | None = None,
    expected_bytes: int | None = None,
    flag: str = "--out",
) -> Path:
    """Check that ``path`` may receive a ``kind`` output folder; return it resolved.

    ``inputs`` maps the flag of each input (``"--model"``, ``"--data"``) to its path (None =
    not given); ``expected_bytes`` is the output's estimated size, checked against the free
    space. Raises :class:`OutputError` naming the path, the rule and the fix; writes nothing
    (the writability probe creates and removes one hidden entry).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}; one of {sorted(KINDS)}")
    out = Path(os.fspath(path)).expanduser().resolve()
    _refuse_special(flag, path, out)
    _refuse_inputs(flag, out, inputs or {})
    spec = KINDS[kind]
    if _exists(out):
        if not out.is_dir():
            raise OutputError(f"{flag} {out} is an existing file, not a folder; give a folder path")
        entries = _entries(out)
        if entries:
            owned = _owned_files(out, kind)
            if owned is None:
                shown = ", ".join(repr(e) for e in entries[:3]) + (", ..." if len(entries) > 3 else "")
                raise OutputError(
                    f"{flag} {out} already exists and is not a {spec.description} (it holds {shown}); pruneserve "
                    "replaces only a folder it wrote, even with --overwrite: give a new or empty folder"
                )
            if not spec.in_place:
                foreign = [e for e in entries if e not in owned]
                if foreign:
                    shown = ", ".join(repr(e) for e in foreign[:3]) + (", ..." if len(foreign) > 3 else "")
                    raise OutputError(
                        f"{flag} {out} is a {spec.description} but also holds files pruneserve did not write "
                        f"({shown}); replacing it would delete them: move them out or give another folder"
                    )
                if not overwrite:
                    raise OutputError(f"{out} already exists; choose another {flag} or pass --overwrite to replace it")
    _probe_writable(flag, out)
    if expected_bytes is not None:
        check_free_space(out, expected_bytes, what=f"the {kind}", flag=flag)
    return out


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def mark_output_dir(folder: str | os.PathLike[str], kind: str, files: list[str] | None = None) -> None:
    """Write :data:`MARKER_FILE` into ``folder``: it is a ``kind`` output holding ``files``."""
    doc: dict[str, object] = {"kind": kind}
    if files is not None:
        doc["files"] = sorted(files)
    (Path(folder) / MARKER_FILE).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


@contextmanager
def atomic_output_dir(
    path: str | os.PathLike[str],
    *,
    kind: str,
    overwrite: bool = False,
    inputs: Mapping[str, str | os.PathLike[str] | None] | None = None,
    flag: str = "--out",
) -> Iterator[Path]:
    """Yield an empty hidden sibling of ``path`` to fill; rename it into place when the block ends.

    The destination is checked (:func:`check_output_dir`) on entry and again just before the
    swap, since the work in the block may take minutes. An existing destination is moved aside,
    the new folder renamed in, and the old one deleted; if the block raises (Ctrl-C included),
    the sibling is removed and ``path`` is untouched. Kinds without a manifest of their own get
    :data:`MARKER_FILE` listing what the block wrote.
    """
    out = check_output_dir(path, overwrite=overwrite, kind=kind, inputs=inputs, flag=flag)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if kind != "artifact":
            mark_output_dir(tmp, kind, [e for e in _entries(tmp) if e != MARKER_FILE and not e.endswith("/")])
        _fsync_dir(tmp)
        check_output_dir(out, overwrite=overwrite, kind=kind, inputs=inputs, flag=flag)
        if _exists(out):
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(old)
            try:
                tmp.rename(out)
            except BaseException:
                old.rename(out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def weights_bytes(folder: str | os.PathLike[str]) -> int:
    """Bytes of a model folder's weights: its top-level ``*.safetensors``, else all its top-level files.

    Sub-folders (a sentence-transformers repository's ``onnx/`` or ``openvino/`` copies) are
    not what the optimizer loads, so they do not count toward the size of what it writes.
    """
    root = Path(folder).expanduser()
    try:
        files = [p for p in root.iterdir() if p.is_file()]
    except OSError:
        return 0
    weights = [p for p in files if p.suffix == ".safetensors"] or files
    return sum(p.stat().st_size for p in weights)


# -- the server's capture file ------------------------------------------------------------------
def _is_capture_line(line: bytes) -> bool:
    try:
        doc = json.loads(line)
    except ValueError:
        return False
    return isinstance(doc, dict) and set(doc) == {"text"} and isinstance(doc["text"], str)


def _check_capture_candidate(flag: str, path: Path) -> None:
    if not _exists(path):
        return
    if path.is_dir():
        raise OutputError(f"{flag} {path} is a folder; give a file path such as {path}/drift.jsonl")
    if not path.is_file():
        raise OutputError(f"{flag} {path} is not a regular file; give a new file path such as /var/lib/pruneserve/x.jsonl")
    try:
        with open(path, "rb") as fh:
            head = fh.read(_CAPTURE_SNIFF_BYTES + 1)
    except OSError as exc:
        raise OutputError(f"{flag} {path} cannot be read ({exc.strerror or exc}); give a new file path") from None
    lines = head[:_CAPTURE_SNIFF_BYTES].split(b"\n")
    if len(head) > _CAPTURE_SNIFF_BYTES or not head.endswith(b"\n"):
        lines = lines[:-1]  # the last line may be cut by the sniff or by a crash mid-append
    lines = [line for line in lines if line.strip()]
    if head.strip() and (not lines or not all(_is_capture_line(line) for line in lines)):
        raise OutputError(
            f"{flag} {path} exists and is not a capture file (JSON lines of {{\"text\": ...}}); the server appends to "
            "and rotates over it, so it must be new or a previous capture: give another path"
        )


def check_capture_file(path: str | os.PathLike[str], *, backups: int, flag: str = "capture_path") -> Path:
    """Check that the server may append to ``path`` and rotate ``PATH.1`` ... ``PATH.backups`` over it.

    Each of those files that exists must be a regular file that is empty or holds only
    ``{"text": ...}`` lines (what :class:`~pruneserve.server.shadow.CaptureWriter` writes), so a
    model, a config or any other file given by mistake is never appended to or rotated away.
    The folder must accept new files (rotation creates them). Returns the path.
    """
    target = Path(os.fspath(path)).expanduser()
    _check_capture_candidate(flag, target)
    for index in range(1, backups + 1):
        _check_capture_candidate(flag, target.with_name(f"{target.name}.{index}"))
    _probe_writable(flag, target)
    return target
