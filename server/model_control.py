"""Model control: what of the model repository to serve, and changing it without a restart.

Triton's model repository extension on the data plane (the transports only translate):
:meth:`ModelController.index`, :meth:`~ModelController.load`, :meth:`~ModelController.unload`,
and in ``poll`` mode a rescan every ``repository_poll_secs``. The modes are Triton's
(``--model-control-mode none|explicit|poll``; see ``docs/model-control.md``).

A version change never loses a request: a new version is verified (sha256 of every file), its
engine built and warmed up off the event loop, and only then made ready; a version it
replaces first stops taking new requests, then finishes everything it accepted, and only
then is closed (:meth:`DataPlane.retire_version`). A version that fails verification is
listed as UNAVAILABLE with its reason and never replaces one that serves; it is tried again
when its folder changes (so an artifact still being copied in loads once complete).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Coroutine, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pruneserve.server.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    ModelLoadError,
    NotFoundError,
    quote,
)
from pruneserve.server.types import LOADING, READY, UNAVAILABLE, UNLOADING, RepositoryEntry
from pruneserve.server.versions import VersionPolicy, scan_repository

if TYPE_CHECKING:
    from pruneserve.server.dataplane import DataPlane

logger = logging.getLogger(__name__)

#: ``--load-model '*'`` loads every model of the repository at start.
ALL_MODELS = "*"
#: Unload parameters accepted and ignored: pruneserve has no ensembles, so no dependents.
IGNORED_UNLOAD_PARAMETERS = frozenset({"unload_dependents"})
Key = tuple[str, str]
T = TypeVar("T")
#: What a version folder looked like when it failed: retried only once it changes.
Fingerprint = tuple[tuple[str, int, int], ...]


def fingerprint(folder: Path) -> Fingerprint:
    """Name, size and mtime of every entry of ``folder`` (empty if it cannot be read)."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
        return tuple((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in entries)
    except OSError:
        return ()


class ModelController:
    """Loads, unloads and polls the model repository on behalf of a :class:`DataPlane`.

    Every change runs under one lock, so a poll never races a load or unload request. Models
    served from artifact folders given on the command line (``artifacts``) are not the
    repository's: they always serve, and load/unload requests for them are refused.
    """

    def __init__(self, dataplane: DataPlane) -> None:
        self._dp = dataplane
        config = dataplane.config
        self.mode = config.model_control_mode
        self.root = Path(config.model_repository) if config.model_repository else None
        self.policy: VersionPolicy = config.policy
        self.poll_seconds = config.repository_poll_secs
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        #: Names from ``artifacts``, beyond model control.
        self._fixed: set[str] = set()
        #: Repository models that should be served (explicit mode: loaded and not unloaded since).
        self._wanted: set[str] = set()
        self._failed: dict[Key, tuple[Fingerprint, str]] = {}
        self._states: dict[Key, str] = {}
        #: Version folders of each model as of its last sync (the index tells new ones apart).
        self._considered: dict[str, set[int]] = {}
        #: Completed rescans (poll mode), for tests and logs.
        self.polls = 0

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self, fixed_names: set[str]) -> None:
        """Load what the mode says to load at start, and start polling in ``poll`` mode."""
        self._fixed = set(fixed_names)
        if self.root is None:
            return
        on_disk = self._scan()
        if self.mode == "explicit":
            asked = self._dp.config.load_models
            names = sorted(on_disk) if ALL_MODELS in asked else list(asked)
            missing = [n for n in names if n not in on_disk]
            for name in missing:
                logger.error("--load-model %s: no such model folder in %s; available: %s", name, self.root, sorted(on_disk))
            names = [n for n in names if n in on_disk]
        else:
            names = sorted(on_disk)
        async with self._lock:
            for name in names:
                self._wanted.add(name)
                await self._sync(name, on_disk[name])
        if self.mode == "poll":
            self._task = asyncio.get_running_loop().create_task(self._poll(), name="model-repository-poll")
        logger.info(
            "model repository %s: mode %s, version policy %s%s", self.root, self.mode, self.policy,
            f", rescanned every {self.poll_seconds:g} s" if self.mode == "poll" else "",
        )

    async def stop(self) -> None:
        """Stop polling (a rescan in progress is cancelled; what it loaded stays consistent)."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    # -- the repository extension ----------------------------------------------------------
    def index(self, ready_only: bool = False) -> list[RepositoryEntry]:
        """Every served version and every version folder of the repository, with its state.

        A version that is not served says why in ``reason``: its load error, ``unloaded``, or
        that the version policy does not select it. A model folder without version folders
        is listed once with an empty version.
        """
        entries: dict[Key, RepositoryEntry] = {}
        repository = self._dp.repository
        for name in repository.names():
            for version in repository.versions(name):
                entries[(name, version)] = RepositoryEntry(name, version, READY)
        if ready_only:
            return self._sorted(entries)
        for (name, version), state in self._states.items():
            entries[(name, version)] = RepositoryEntry(name, version, state)
        for (name, version), (_, message) in self._failed.items():
            entries.setdefault((name, version), RepositoryEntry(name, version, UNAVAILABLE, message))
        # A directory listing per model: cheap next to a request, and an index is rare.
        for name, folders in self._scan_quietly().items():
            if not folders and not any(key[0] == name for key in entries):
                entries[(name, "")] = RepositoryEntry(name, "", UNAVAILABLE, "no version folder (<name>/<version>/)")
            for number in folders:
                if name not in self._wanted:
                    why = "unloaded"
                elif number in self._considered.get(name, ()):
                    why = f"not selected by the version policy {self.policy}"
                else:  # appeared since the last scan
                    why = "found in the repository; not loaded yet"
                entries.setdefault((name, str(number)), RepositoryEntry(name, str(number), UNAVAILABLE, why))
        return self._sorted(entries)

    @staticmethod
    def _sorted(entries: dict[Key, RepositoryEntry]) -> list[RepositoryEntry]:
        return [entries[k] for k in sorted(entries, key=lambda k: (k[0], _version_order(k[1])))]

    async def load(self, name: str, parameters: Iterable[str] = ()) -> None:
        """Load (or reload) ``name`` from the repository as the version policy says.

        ``parameters`` are the names of the request's load parameters; Triton's overrides
        (``config``, ``file:...``) are refused: the repository's folders are what loads.

        Raises:
            FailedPreconditionError: not ``explicit`` mode, or ``name`` is not a repository model.
            InvalidArgumentError: no name, or override parameters.
            NotFoundError: the repository has no folder ``name``.
            ModelLoadError: no version of it could be loaded (each refusal is logged).
        """
        self._check_controllable(name, "load")
        given = sorted(parameters)
        if given:
            raise InvalidArgumentError(
                f"load parameters {quote(given)} are not supported: pruneserve loads the artifact folders of the "
                "model repository as they are; put a new version in the repository as <name>/<version>/ and load again"
            )
        # To its end even when the requester goes away: a load is never left half done.
        await run_to_end(self._load(name))

    async def _load(self, name: str) -> None:
        async with self._lock:
            on_disk = self._scan()
            if name not in on_disk:
                raise NotFoundError(
                    f"the model repository has no model folder {quote(name)}; available: {sorted(on_disk)}"
                )
            self._wanted.add(name)
            # A load request is an explicit retry: forget earlier failures of this model.
            for key in [k for k in self._failed if k[0] == name]:
                del self._failed[key]
            await self._sync(name, on_disk[name])
            if not self._dp.repository.versions(name):
                reasons = [m for (n, _), (_, m) in self._failed.items() if n == name]
                raise ModelLoadError(
                    f"model {name!r}: no version could be loaded"
                    + (f": {reasons[0]}" if reasons else f" (no version folder that the version policy {self.policy} selects)")
                )

    async def unload(self, name: str, parameters: Iterable[str] = ()) -> None:
        """Stop serving every version of ``name``; accepted requests finish first.

        Raises:
            FailedPreconditionError: not ``explicit`` mode, or ``name`` is not a repository model.
            InvalidArgumentError: no name, or parameters other than ``unload_dependents``.
            NotFoundError: ``name`` is neither loaded nor in the repository.
        """
        self._check_controllable(name, "unload")
        unknown = sorted(set(parameters) - IGNORED_UNLOAD_PARAMETERS)
        if unknown:
            raise InvalidArgumentError(
                f"unload parameters {quote(unknown)} are not supported; send none (or unload_dependents, ignored)"
            )
        await run_to_end(self._unload(name))

    async def _unload(self, name: str) -> None:
        async with self._lock:
            loaded = self._dp.repository.versions(name)
            if not loaded and name not in self._scan_quietly():
                raise NotFoundError(f"model {quote(name)} is not loaded and not in the model repository")
            self._wanted.discard(name)
            for version in loaded:
                await self._retire(name, version, "unload requested")

    def _check_controllable(self, name: str, action: str) -> None:
        if not name:
            raise InvalidArgumentError(f"a repository {action} request must name the model to {action}")
        if self.mode != "explicit":
            raise FailedPreconditionError(
                f"cannot {action} model {quote(name)}: model control mode is {self.mode!r}; start the server with "
                "--model-control-mode explicit (and --model-repository DIR) to load and unload models by request"
            )
        if name in self._fixed:
            raise FailedPreconditionError(
                f"cannot {action} model {quote(name)}: it is served from an artifact folder given on the command line, "
                "not from the model repository; move it into the repository as <name>/<version>/ to control it"
            )

    # -- polling ----------------------------------------------------------------------------
    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_seconds)
            try:
                async with self._lock:
                    await self._rescan()
                self.polls += 1
            except asyncio.CancelledError:
                raise
            except Exception:  # one bad rescan (e.g. the folder briefly unreadable) must not stop polling
                logger.exception("model repository %s: rescan failed; retrying in %g s", self.root, self.poll_seconds)

    async def _rescan(self) -> None:
        on_disk = self._scan()
        for name in sorted(on_disk):
            self._wanted.add(name)
            await self._sync(name, on_disk[name])
        for name in sorted(self._wanted - set(on_disk)):
            self._wanted.discard(name)
            self._considered.pop(name, None)
            for version in self._dp.repository.versions(name):
                await self._retire(name, version, "its folder left the model repository")
        for key in [k for k in self._failed if k[0] not in on_disk]:
            del self._failed[key]

    # -- one model --------------------------------------------------------------------------
    async def _sync(self, name: str, folders: dict[int, Path]) -> None:
        """Serve the versions of ``name`` the policy selects among those that load, then retire
        the others. Nothing is retired unless some selected version is ready."""
        if name in self._fixed:
            logger.error(
                "model repository: %s is already served from a command-line artifact; its repository folder is ignored",
                name,
            )
            return
        repository = self._dp.repository
        self._considered[name] = set(folders)
        keep: list[str] = []
        for number in self.policy.candidates(folders):
            if self.policy.limit is not None and len(keep) >= self.policy.limit:
                break
            version = str(number)
            if version in repository.versions(name):
                keep.append(version)
                continue
            folder = folders[number]
            seen = fingerprint(folder)
            failed = self._failed.get((name, version))
            if failed is not None and failed[0] == seen:
                continue  # unchanged since it failed: skipped without another log line
            self._states[(name, version)] = LOADING
            try:
                await self._dp.add_version(folder, name, version)
            except Exception as exc:  # noqa: BLE001 - any refusal is recorded; the other versions serve
                failure = repository.record_failure(folder, exc)
                self._failed[(name, version)] = (seen, self._redact(failure.message))
                continue
            finally:
                self._states.pop((name, version), None)
            self._failed.pop((name, version), None)
            keep.append(version)
        if not keep:
            return
        for version in repository.versions(name):
            if version not in keep:
                await self._retire(name, version, f"version policy {self.policy} now selects {sorted(keep, key=_version_order)}")

    async def _retire(self, name: str, version: str, why: str) -> None:
        self._states[(name, version)] = UNLOADING
        try:
            logger.info("model %s version %s: unloading (%s); its accepted requests finish first", name, version, why)
            # Once a version stops taking requests it must also be closed, even if a poll is
            # cancelled at shutdown or the caller of an unload goes away.
            await run_to_end(self._dp.retire_version(name, version))
        finally:
            self._states.pop((name, version), None)

    def _redact(self, message: str) -> str:
        """``message`` with the repository's path replaced: index reasons and load errors go to
        clients, which never see the server's file system (the log has the full message)."""
        if self.root is None:
            return message
        for form in {str(self.root.resolve()), str(self.root)}:
            message = message.replace(form, "<model repository>")
        return message

    # -- disk -------------------------------------------------------------------------------
    def _scan(self) -> dict[str, dict[int, Path]]:
        if self.root is None:
            return {}
        try:
            return scan_repository(self.root)
        except OSError as exc:
            raise ModelLoadError(self._redact(f"cannot read the model repository {self.root}: {exc}")) from exc

    def _scan_quietly(self) -> dict[str, dict[int, Path]]:
        try:
            return self._scan()
        except ModelLoadError:
            return {}


async def run_to_end(operation: Coroutine[Any, Any, T]) -> T:
    """Await ``operation``, which goes on to its end even if the awaiting task is cancelled."""
    task = asyncio.ensure_future(operation)
    # Retrieved here, so a failure after the awaiting task left is not reported as never
    # retrieved (the controller logs its own failures).
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return await asyncio.shield(task)


def _version_order(version: str) -> tuple[int, str]:
    return (int(version), version) if version.isdigit() else (-1, version)


__all__ = ["ALL_MODELS", "IGNORED_UNLOAD_PARAMETERS", "ModelController", "fingerprint", "run_to_end"]
