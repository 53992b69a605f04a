"""Model versions on disk: the repository layout, and which versions the policy serves.

A model repository is a folder of ``<model name>/<version>/`` artifact folders, as in Triton::

    models/
      minilm/
        1/   manifest.json, model.onnx, tokenizer.json, ...
        2/   (a re-optimized artifact)

The model's name is its folder's name and the version is the version folder's (a positive
integer), whatever the manifest says: the layout is what an operator edits. Anything else in
the folder (files, hidden or non-numeric folders) is ignored with one log line.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pruneserve.server.errors import ConfigError

logger = logging.getLogger(__name__)

#: ``--model-control-mode`` values (Triton's names).
CONTROL_MODES: tuple[str, ...] = ("none", "explicit", "poll")

PolicyKind = Literal["latest", "all", "specific"]
_POLICY_FORMS = "'latest:N' (the N highest versions that load), 'all', or 'specific:1,3'"


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions of a model to serve (Triton's ``version_policy``).

    Attributes:
        kind: ``latest`` (the ``count`` highest versions that load), ``all`` or ``specific``.
        count: for ``latest``, how many versions.
        versions: for ``specific``, the versions to serve.
    """

    kind: PolicyKind = "latest"
    count: int = 1
    versions: tuple[int, ...] = ()

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        """``latest:N`` | ``latest`` (= ``latest:1``) | ``all`` | ``specific:V[,V...]``."""
        if not isinstance(text, str):
            raise ConfigError(f"version_policy {text!r} must be a string: {_POLICY_FORMS}")
        kind, _, arg = text.strip().partition(":")
        kind = kind.strip().lower()
        try:
            if kind == "latest":
                count = int(arg) if arg.strip() else 1
                if count < 1:
                    raise ValueError
                return cls("latest", count=count)
            if kind == "all" and not arg.strip():
                return cls("all")
            if kind == "specific":
                versions = tuple(sorted({int(v) for v in arg.split(",") if v.strip()}))
                if not versions or versions[0] < 1:
                    raise ValueError
                return cls("specific", versions=versions)
        except ValueError:
            pass
        raise ConfigError(f"version_policy {text!r} is invalid; use {_POLICY_FORMS}")

    def __str__(self) -> str:
        if self.kind == "latest":
            return f"latest:{self.count}"
        if self.kind == "specific":
            return "specific:" + ",".join(str(v) for v in self.versions)
        return "all"

    def candidates(self, on_disk: Iterable[int]) -> list[int]:
        """The versions to try, in the order to try them (highest first).

        For ``latest:N`` this is every version on disk, highest first: the caller keeps the
        first N that load, so a version that fails verification is passed over, never served
        in place of a good one. For ``all`` and ``specific`` it is the versions they name.
        """
        ordered = sorted(set(on_disk), reverse=True)
        if self.kind == "specific":
            return [v for v in ordered if v in self.versions]
        return ordered

    @property
    def limit(self) -> int | None:
        """How many versions to keep at most (None: every candidate that loads)."""
        return self.count if self.kind == "latest" else None


def parse_version(name: str) -> int | None:
    """The version a folder name stands for (``"3"`` -> 3), or None when it is not one."""
    if name.isdigit() and not name.startswith("0"):
        return int(name)
    return None


def scan_repository(root: str | os.PathLike[str]) -> dict[str, dict[int, Path]]:
    """``{model name: {version: folder}}`` of a repository folder.

    Raises:
        OSError: the repository folder itself cannot be read.
    """
    base = Path(root)
    found: dict[str, dict[int, Path]] = {}
    for model_dir in sorted(base.iterdir()):
        if model_dir.name.startswith(".") or not model_dir.is_dir():
            continue
        versions: dict[int, Path] = {}
        try:
            entries = sorted(model_dir.iterdir())
        except OSError as exc:
            logger.warning("model repository: cannot read %s (%s); skipped", model_dir, exc.strerror or exc)
            continue
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_dir():
                continue  # hidden: e.g. an artifact being written beside its destination
            version = parse_version(entry.name)
            if version is None:
                logger.debug("model repository: %s is not a version folder (a positive integer); ignored", entry)
                continue
            versions[version] = entry
        found[model_dir.name] = versions
    return found


__all__ = ["CONTROL_MODES", "VersionPolicy", "parse_version", "scan_repository"]
