"""Regenerate the gRPC stubs in ``server/_proto/`` from the ``.proto`` sources in ``protos/``.

    python -m pruneserve.server.protogen            # rewrite server/_proto/
    python -m pruneserve.server.protogen --check    # fail if the checked-in stubs are stale

``grpc_tools.protoc`` writes flat modules (``import model_config_pb2``); this tool rewrites
those imports to be package-relative, and registers our descriptors in a private
descriptor pool (``pruneserve.server._proto.POOL``) instead of protobuf's default one.
The private pool matters: tritonclient ships its own ``grpc_service.proto`` with the same
``inference.*`` symbols, and protobuf refuses a second, different file of the same name in
one pool, so without it the server and tritonclient could not be imported in one process
(in-process tests, or an application embedding both). The wire format is unaffected.

The output is deterministic for a given ``grpcio-tools`` version, which is why ``--check``
can compare byte for byte; regenerate after changing a ``.proto`` or upgrading the tools.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import re
import sys
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

_REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = _REPO_ROOT / "protos"
OUT_DIR = Path(__file__).resolve().parent / "_proto"
PROTO_FILES: tuple[str, ...] = ("model_config.proto", "grpc_service.proto")

_INIT = '''"""Generated gRPC stubs (``python -m pruneserve.server.protogen``); never edit by hand.

Import as ``from pruneserve.server._proto import grpc_service_pb2 as pb``. ``POOL`` is the
private descriptor pool the stubs register in (see :mod:`pruneserve.server.protogen`).
"""

from google.protobuf import descriptor_pool as _descriptor_pool

POOL = _descriptor_pool.DescriptorPool()
'''

# `import foo_pb2 as bar` -> `from . import foo_pb2 as bar` for our own generated modules.
_FLAT_IMPORT = re.compile(r"^import (\w+_pb2) as (\w+)$", re.MULTILINE)
_DEFAULT_POOL = "_descriptor_pool.Default().AddSerializedFile("
_PRIVATE_POOL = "POOL.AddSerializedFile("
_POOL_IMPORT = "from . import POOL\n"


class ProtogenError(RuntimeError):
    """protoc failed, or its output did not have the shape this tool rewrites."""


def _rewrite(name: str, text: str, generated: set[str]) -> str:
    """Make one generated file package-relative and bound to the private pool."""

    def relative(match: re.Match[str]) -> str:
        module, alias = match.group(1), match.group(2)
        if module not in generated:
            return match.group(0)
        return f"from . import {module} as {alias}"

    text = _FLAT_IMPORT.sub(relative, text)
    if name.endswith("_pb2.py"):
        if text.count(_DEFAULT_POOL) != 1:
            raise ProtogenError(f"{name}: expected one default-pool registration to redirect")
        text = text.replace(_DEFAULT_POOL, _PRIVATE_POOL)
        marker = "# @@protoc_insertion_point(imports)\n"
        if marker not in text:
            raise ProtogenError(f"{name}: protoc's imports insertion point is missing")
        text = text.replace(marker, marker + _POOL_IMPORT, 1)
    return text


def generate(out_dir: Path, proto_dir: Path = PROTO_DIR) -> list[Path]:
    """Run protoc over ``PROTO_FILES`` into ``out_dir`` and post-process; returns the files written."""
    import grpc_tools
    from grpc_tools import protoc  # dev dependency: only regeneration needs it

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        include = Path(grpc_tools.__file__).parent / "_proto"
        args = [
            "grpc_tools.protoc",
            f"-I{proto_dir}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(str(proto_dir / p) for p in PROTO_FILES),
        ]
        rc = protoc.main(args)
        if rc != 0:
            raise ProtogenError(f"protoc exited with {rc} for {', '.join(PROTO_FILES)} in {proto_dir}")
        produced = sorted(Path(tmp).iterdir())
        generated = {p.name.removesuffix(".py") for p in produced if p.name.endswith("_pb2.py")}
        written: list[Path] = []
        for src in produced:
            text = src.read_text(encoding="utf-8")
            # protoc emits a *_pb2_grpc.py for every file; one without a service is empty noise.
            if src.name.endswith("_pb2_grpc.py") and "class " not in text:
                continue
            dst = out_dir / src.name
            dst.write_text(_rewrite(src.name, text, generated), encoding="utf-8")
            written.append(dst)
    init = out_dir / "__init__.py"
    init.write_text(_INIT, encoding="utf-8")
    written.append(init)
    return sorted(written)


def check(out_dir: Path = OUT_DIR, proto_dir: Path = PROTO_DIR) -> list[str]:
    """Regenerate into a temporary directory; return a description of every difference."""
    problems: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name: p for p in generate(Path(tmp), proto_dir)}
        current = {p.name: p for p in out_dir.glob("*.py*") if p.is_file()}
        for name in sorted(set(fresh) | set(current)):
            if name not in current:
                problems.append(f"{name}: missing from {out_dir}")
            elif name not in fresh:
                problems.append(f"{name}: not produced by the .proto sources (stale file)")
            else:
                old = current[name].read_text(encoding="utf-8")
                new = fresh[name].read_text(encoding="utf-8")
                if old != new:
                    diff = difflib.unified_diff(
                        old.splitlines(),
                        new.splitlines(),
                        f"checked-in/{name}",
                        f"regenerated/{name}",
                        lineterm="",
                        n=1,
                    )
                    problems.append(f"{name}: differs\n" + "\n".join(list(diff)[:20]))
    return problems


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns 0 on success, 1 when ``--check`` finds stale stubs."""
    parser = argparse.ArgumentParser(prog="python -m pruneserve.server.protogen", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if server/_proto/ differs from a fresh generation")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.check:
        problems = check()
        if problems:
            for p in problems:
                logger.error("%s", p)
            logger.error("the stubs in %s are stale: run `make protos` and commit the result", OUT_DIR)
            return 1
        logger.info("stubs in %s match %s", OUT_DIR, PROTO_DIR)
        return 0
    for path in generate(OUT_DIR):
        logger.info("wrote %s", path)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
