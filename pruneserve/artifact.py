"""The artifact format: the only contract between the optimizer and the server.

An artifact is a directory::

    model.onnx          the optimized graph (inputs/outputs as declared in the manifest)
    tokenizer.json      a `tokenizers` fast-tokenizer file
    manifest.json       this module's schema: what the model is, how it was made, every file's sha256
    report.md, *.png    the optimizer's human-readable report (optional)
    reference.onnx      the unpruned fp32 model, for live shadow comparison (optional)

This module must not import torch (the server uses it). The optimizer writes through
:func:`write_artifact`, which builds the directory beside its destination and renames it
into place only when complete, so an interrupted run never leaves a half-written artifact.
The server reads through :func:`load_artifact`, which verifies the schema version, that
every file named stays inside the directory, and every file's sha256.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
REFERENCE_FILE = "reference.onnx"

Task = Literal["embedding", "classification"]
TASKS: tuple[str, ...] = ("embedding", "classification")
#: How an embedding model pools its token states (inside the graph), as sentence-transformers names them.
POOLINGS: tuple[str, ...] = ("mean", "cls", "max")
#: ONNX input names an artifact may declare, in this order.
KNOWN_INPUTS: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids")
_CHUNK = 1 << 20
#: Longest token sequence a manifest may declare (the server's own limit is the same).
MAX_SEQUENCE_LENGTH = 1_000_000
#: Free-form manifest fields: each must be a JSON object.
_DICT_FIELDS: tuple[str, ...] = (
    "runtime", "quantization", "pruning", "fusion", "quality", "latency", "engines", "source", "tool_versions", "config",
)  # fmt: skip


class ArtifactError(Exception):
    """Base class of every problem with an artifact directory."""


class ArtifactNotFoundError(ArtifactError):
    """The directory or its manifest does not exist."""


class ManifestError(ArtifactError):
    """The manifest is not valid JSON or does not follow the schema."""


class UnsupportedSchemaError(ManifestError):
    """The manifest declares a schema version this build does not read."""


class IntegrityError(ArtifactError):
    """A file is missing, escapes the artifact directory, or its sha256 differs."""


@dataclass
class OutputSpec:
    """One output tensor of the graph: FP32 of shape ``[batch, *dims]``."""

    name: str
    dims: list[int]
    datatype: str = "FP32"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ManifestError(f"output name {self.name!r} must be a non-empty string")
        if (
            not isinstance(self.dims, list)
            or not self.dims
            or any(not _is_int(d) or d <= 0 for d in self.dims)
        ):
            raise ManifestError(f"output {self.name!r} has dims {self.dims!r}; expected a list of positive integers")
        if not isinstance(self.datatype, str):
            raise ManifestError(f"output {self.name!r} has datatype {self.datatype!r}; expected a string such as 'FP32'")

    @classmethod
    def from_value(cls, value: Any) -> OutputSpec:
        """An :class:`OutputSpec` from itself or a manifest's ``{"name", "dims", "datatype"}`` object."""
        if isinstance(value, OutputSpec):
            return value
        if not isinstance(value, Mapping):
            raise ManifestError(f"each entry of 'outputs' must be an object with name and dims, got {value!r}")
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise ManifestError(f"output entry {dict(value)!r} has unknown keys {unknown}; allowed: {sorted(allowed)}")
        missing = sorted({"name", "dims"} - set(value))
        if missing:
            raise ManifestError(f"output entry {dict(value)!r} lacks {missing}")
        return cls(**value)


@dataclass
class Manifest:
    """What an artifact is and how it was made.

    The first block of fields is what the server needs to serve the model; the free-form
    dictionaries record how the optimizer made it (for people, reports and metrics labels).
    """

    name: str
    task: str
    inputs: list[str]
    outputs: list[OutputSpec]
    max_sequence_length: int
    version: int = 1
    labels: list[str] = field(default_factory=list)
    model_file: str = MODEL_FILE
    tokenizer_file: str | None = TOKENIZER_FILE
    reference_file: str | None = None
    #: Whether a request's answer is independent of its batch-mates (fp32, static INT8).
    batch_invariant: bool = True
    #: Mean cosine fidelity (embedding) or accuracy-drop floor (classification) promised.
    quality_floor: float | None = None
    #: Recommended runtime, e.g. {"engine": "onnxruntime", "providers": ["CPUExecutionProvider"]}.
    runtime: dict[str, Any] = field(default_factory=dict)
    quantization: dict[str, Any] = field(default_factory=dict)
    pruning: dict[str, Any] = field(default_factory=dict)
    fusion: dict[str, Any] = field(default_factory=dict)
    quality: dict[str, Any] = field(default_factory=dict)
    latency: dict[str, Any] = field(default_factory=dict)
    engines: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    tool_versions: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    target: str = "cpu"
    opset: int | None = None
    created_at: str | None = None
    #: Embedding models: the pooling (one of POOLINGS) and whether the embedding is L2-normalised,
    #: both computed inside the graph. None for classifiers and for artifacts made before they were recorded.
    pooling: str | None = None
    normalize: bool | None = None
    #: relative file name -> {"sha256": hex, "size": bytes}; filled by write_artifact.
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        self._check_types()
        self.outputs = [OutputSpec.from_value(o) for o in self.outputs]
        if self.schema_version != SCHEMA_VERSION:
            raise UnsupportedSchemaError(
                f"manifest schema_version {self.schema_version!r} is not supported (this build reads "
                f"{SCHEMA_VERSION}); re-run `pruneserve optimize` with this version of pruneserve"
            )
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            raise ManifestError(
                f"model name {self.name!r} is invalid: use letters, digits, '-', '_' and '.' only"
            )
        if self.task not in TASKS:
            raise ManifestError(f"task {self.task!r} is not one of {TASKS}")
        if self.version < 1:
            raise ManifestError(f"version {self.version!r} must be an integer >= 1")
        unknown = [i for i in self.inputs if i not in KNOWN_INPUTS]
        if unknown or "input_ids" not in self.inputs:
            raise ManifestError(f"inputs {self.inputs!r} must include 'input_ids' and only {KNOWN_INPUTS}")
        if not 2 <= self.max_sequence_length <= MAX_SEQUENCE_LENGTH:
            raise ManifestError(
                f"max_sequence_length {self.max_sequence_length!r} must be an integer in [2, {MAX_SEQUENCE_LENGTH}]"
            )
        if not self.outputs:
            raise ManifestError("manifest declares no outputs")
        if self.pooling is not None and self.pooling not in POOLINGS:
            raise ManifestError(f"pooling {self.pooling!r} is not one of {POOLINGS}")
        if self.task != "embedding" and (self.pooling is not None or self.normalize is not None):
            raise ManifestError(
                f"a {self.task} model has no pooling or normalisation (got pooling={self.pooling!r}, "
                f"normalize={self.normalize!r}); set both to null"
            )
        if self.task == "classification":
            n = self.outputs[0].dims[-1]
            if len(self.labels) != n:
                raise ManifestError(
                    f"classification model has {n} logits but {len(self.labels)} labels in the manifest"
                )
        for f in (self.model_file, self.tokenizer_file, self.reference_file):
            if f is not None:
                _check_relative(f)
        for name in self.files:
            _check_relative(name)

    def _check_types(self) -> None:
        """Refuse a field of the wrong JSON type, naming it.

        ``manifest.json`` is not covered by its own hash, so it may hold anything; every later
        check (and the server) relies on the types the dataclass declares.
        """
        for name in ("name", "task", "model_file", "target"):
            _expect(name, getattr(self, name), isinstance(getattr(self, name), str), "a string")
        for name in ("tokenizer_file", "reference_file", "created_at", "pooling"):
            value = getattr(self, name)
            _expect(name, value, value is None or isinstance(value, str), "a string or null")
        for name in ("version", "max_sequence_length", "schema_version"):
            _expect(name, getattr(self, name), _is_int(getattr(self, name)), "an integer")
        _expect("opset", self.opset, self.opset is None or _is_int(self.opset), "an integer or null")
        _expect("batch_invariant", self.batch_invariant, isinstance(self.batch_invariant, bool), "true or false")
        _expect("normalize", self.normalize, self.normalize is None or isinstance(self.normalize, bool),
                "true, false or null")
        floor = self.quality_floor
        _expect(
            "quality_floor", floor,
            floor is None or (isinstance(floor, (int, float)) and not isinstance(floor, bool)), "a number or null",
        )  # fmt: skip
        for name in ("inputs", "labels"):
            value = getattr(self, name)
            _expect(
                name, value, isinstance(value, list) and all(isinstance(v, str) for v in value), "a list of strings"
            )
        _expect("outputs", self.outputs, isinstance(self.outputs, list), "a list of {name, dims} objects")
        for name in _DICT_FIELDS:
            _expect(name, getattr(self, name), isinstance(getattr(self, name), dict), "an object")
        _expect("files", self.files, isinstance(self.files, dict), 'an object of file name -> {"sha256", "size"}')
        for fname, meta in self.files.items():
            if not isinstance(fname, str) or not isinstance(meta, dict):
                raise ManifestError(
                    f"manifest field 'files' entry {fname!r}: {meta!r} must map a file name to "
                    '{"sha256": hex string, "size": bytes}'
                )
            if not isinstance(meta.get("sha256"), str):
                raise ManifestError(
                    f"manifest field 'files' entry {fname!r} has sha256 {meta.get('sha256')!r}; expected a hex string"
                )
            if "size" in meta and (not _is_int(meta["size"]) or meta["size"] < 0):
                raise ManifestError(
                    f"manifest field 'files' entry {fname!r} has size {meta['size']!r}; expected an integer >= 0"
                )

    # -- (de)serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dictionary of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        """Build a manifest from a dictionary, rejecting unknown or missing fields by name."""
        if not isinstance(data, Mapping):
            raise ManifestError(f"manifest must be a JSON object, got {type(data).__name__}")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise UnsupportedSchemaError(
                f"manifest schema_version {version!r} is not supported (this build reads "
                f"{SCHEMA_VERSION}); re-run `pruneserve optimize` with this version of pruneserve"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ManifestError(f"manifest has unknown fields {unknown}")
        try:
            return cls(**dict(data))
        except TypeError as exc:
            raise ManifestError(f"manifest does not follow the schema: {exc}") from None

    @property
    def output_names(self) -> list[str]:
        """Names of the graph's outputs, in order."""
        return [o.name for o in self.outputs]


@dataclass(frozen=True)
class Artifact:
    """A loaded, verified artifact directory."""

    path: Path
    manifest: Manifest

    def file(self, name: str) -> Path:
        """Absolute path of a file listed in the manifest."""
        return _resolve_inside(self.path, name)

    @property
    def model_path(self) -> Path:
        return self.file(self.manifest.model_file)

    @property
    def tokenizer_path(self) -> Path | None:
        return self.file(self.manifest.tokenizer_file) if self.manifest.tokenizer_file else None

    @property
    def reference_path(self) -> Path | None:
        return self.file(self.manifest.reference_file) if self.manifest.reference_file else None


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _is_int(value: Any) -> bool:
    """Whether ``value`` is an integer; JSON ``true``/``false`` are not (bool subclasses int)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _expect(field_name: str, value: Any, ok: bool, expected: str) -> None:
    if not ok:
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        raise ManifestError(f"manifest field {field_name!r} is {shown} ({type(value).__name__}); expected {expected}")


def _check_relative(name: str) -> None:
    # NUL and other control characters make os calls raise ValueError (or name files no
    # person can read back), so they are refused with the other unsafe names.
    if not isinstance(name, str) or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise IntegrityError(
            f"file name {name!r} in the manifest is not a plain relative path inside the artifact "
            "(control characters are not allowed)"
        )
    p = Path(name)
    if p.is_absolute() or ".." in p.parts or name in ("", ".") or "\\" in name:
        raise IntegrityError(
            f"file name {name!r} in the manifest is not a plain relative path inside the artifact"
        )


def _resolve_inside(root: Path, name: str) -> Path:
    _check_relative(name)
    root = root.resolve()
    path = (root / name).resolve()
    if root not in path.parents:
        raise IntegrityError(f"file {name!r} resolves outside the artifact directory {root}")
    return path


def write_artifact(
    out_dir: str | os.PathLike[str],
    manifest: Manifest,
    sources: Mapping[str, str | os.PathLike[str] | bytes],
    *,
    overwrite: bool = False,
) -> Artifact:
    """Write an artifact atomically and return it, verified.

    ``sources`` maps each file name inside the artifact to a source path (copied) or bytes.
    Every file the manifest names (model, tokenizer, reference) must be among them. The
    directory is assembled in a hidden sibling folder and renamed into place at the end;
    on any error the sibling is removed and ``out_dir`` is untouched. ``out_dir`` may be new or
    empty; with ``overwrite`` it may also be an artifact holding nothing else
    (:func:`pruneserve.outputs.check_output_dir`); anything else raises
    :class:`~pruneserve.outputs.OutputError` and is left alone.
    """
    # Imported here: pruneserve.outputs reads manifests through this module.
    from pruneserve.outputs import atomic_output_dir

    out = Path(out_dir).expanduser().resolve()
    for required in (manifest.model_file, manifest.tokenizer_file, manifest.reference_file):
        if required is not None and required not in sources:
            raise ArtifactError(f"the manifest names {required!r} but no such file was given")
    if MANIFEST_NAME in sources:
        raise ArtifactError(f"{MANIFEST_NAME} is written by write_artifact itself")
    with atomic_output_dir(out_dir, kind="artifact", overwrite=overwrite) as tmp:
        files: dict[str, dict[str, Any]] = {}
        for name, src in sorted(sources.items()):
            dest = _resolve_inside(tmp, name)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(src, bytes):
                dest.write_bytes(src)
            else:
                shutil.copyfile(src, dest)
            with open(dest, "rb+") as fh:
                os.fsync(fh.fileno())
            files[name] = {"sha256": sha256_file(dest), "size": dest.stat().st_size}
        manifest.files = files
        text = json.dumps(manifest.to_dict(), indent=2, sort_keys=False) + "\n"
        with open(tmp / MANIFEST_NAME, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
    logger.info("wrote artifact %s (%d files)", out, len(files) + 1)
    return load_artifact(out)


def read_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Parse ``manifest.json`` of an artifact directory without checking files."""
    root = Path(path)
    mpath = root / MANIFEST_NAME
    if not root.is_dir():
        raise ArtifactNotFoundError(f"artifact directory {root} does not exist")
    if not mpath.is_file():
        raise ArtifactNotFoundError(f"{root} has no {MANIFEST_NAME}; is it a pruneserve artifact?")
    try:
        data = json.loads(mpath.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{mpath} is not valid JSON: {exc}") from None
    return Manifest.from_dict(data)


def load_artifact(path: str | os.PathLike[str], *, verify: bool = True) -> Artifact:
    """Read and verify an artifact directory.

    Checks the schema, that every listed file stays inside the directory, that the files
    the manifest relies on are listed, and (``verify=True``) each file's size and sha256.
    """
    root = Path(path).resolve()
    manifest = read_manifest(root)
    for required in (manifest.model_file, manifest.tokenizer_file, manifest.reference_file):
        if required is not None and required not in manifest.files:
            raise IntegrityError(f"{root}: the manifest uses {required!r} but does not list its sha256")
    for name, meta in manifest.files.items():
        fpath = _resolve_inside(root, name)
        if not fpath.is_file():
            raise IntegrityError(f"{root}: file {name!r} listed in the manifest is missing")
        if not verify:
            continue
        if not isinstance(meta, Mapping) or "sha256" not in meta:
            raise ManifestError(f"{root}: manifest entry for {name!r} has no sha256")
        size = fpath.stat().st_size
        if "size" in meta and meta["size"] != size:
            raise IntegrityError(
                f"{root}: {name!r} is {size} bytes but the manifest says {meta['size']} "
                "(truncated or replaced); rebuild the artifact"
            )
        digest = sha256_file(fpath)
        if digest != meta["sha256"]:
            raise IntegrityError(
                f"{root}: sha256 of {name!r} is {digest[:12]}… but the manifest says "
                f"{str(meta['sha256'])[:12]}… (altered or corrupted); rebuild the artifact"
            )
    return Artifact(path=root, manifest=manifest)
