"""No pickle on any load path: a static scan of the source, and an audit of what serving opens.

Pickle (and everything built on it: ``torch.load``, ``joblib``, ``np.load(allow_pickle=True)``,
``yaml.load`` with an unsafe loader, TorchScript archives) runs code from the file it reads,
so a tampered model folder or artifact would own the process. The product reads ONNX,
safetensors, JSON and ``tokenizer.json`` only. The static half walks every module's syntax
tree (aliases resolved, so ``from torch import load as l`` is caught too); the dynamic half
serves an artifact with a booby-trapped pickle beside it under a Python audit hook and
checks which files were opened and that the unpickler never ran.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: Folders whose code runs when a model or artifact is loaded (optimizer, server, the CLI).
SCANNED = ("pruneserve", "server", "optimizer")

#: Modules whose import alone means a pickle-family reader is in reach.
FORBIDDEN_MODULES = frozenset({"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"})
#: Fully-qualified callables that unpickle whatever they are given.
FORBIDDEN_CALLS = frozenset({
    "torch.load", "torch.serialization.load", "torch.jit.load", "torch.hub.load", "torch.hub.load_state_dict_from_url",
    "pandas.read_pickle", "numpy.lib.format.read_array", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all",
})  # fmt: skip
#: ``from_pretrained`` receivers that only ever read JSON / tokenizer files.
JSON_ONLY_PRETRAINED = ("Config", "Tokenizer")
SAFE_YAML_LOADERS = frozenset({"SafeLoader", "CSafeLoader", "BaseLoader"})


@dataclass(frozen=True)
class Finding:
    """One forbidden construct: where, and what."""

    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


def _dotted(node: ast.expr) -> str | None:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_literal(node: ast.expr | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def scan_source(source: str, where: str) -> list[Finding]:
    """Every pickle-family import or call in one module's source."""
    tree = ast.parse(source, filename=where)
    aliases: dict[str, str] = {}  # local name -> fully-qualified name
    findings: list[Finding] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                aliases[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else alias.name.split(".")[0]
                if alias.name.split(".")[0] in FORBIDDEN_MODULES:
                    findings.append(Finding(f"{where}:{node.lineno}", f"import {alias.name}"))
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
            if node.module.split(".")[0] in FORBIDDEN_MODULES:
                findings.append(Finding(f"{where}:{node.lineno}", f"from {node.module} import ..."))
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if name is None:
            continue
        head, _, rest = name.partition(".")
        qualified = f"{aliases.get(head, head)}.{rest}" if rest else aliases.get(head, head)
        at = f"{where}:{node.lineno}"
        if qualified in FORBIDDEN_CALLS or qualified.split(".")[0] in FORBIDDEN_MODULES:
            findings.append(Finding(at, f"call {qualified}"))
        elif qualified in ("numpy.load", "np.load") and not (
            _keyword(node, "allow_pickle") is None or _is_literal(_keyword(node, "allow_pickle"), False)
        ):
            findings.append(Finding(at, f"call {qualified}(allow_pickle=...)"))
        elif qualified == "yaml.load":
            loader = _keyword(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            loader_name = _dotted(loader) if loader is not None else None
            if loader_name is None or loader_name.split(".")[-1] not in SAFE_YAML_LOADERS:
                findings.append(Finding(at, "call yaml.load without a safe Loader"))
        elif qualified.endswith(".from_pretrained"):
            receiver = qualified.rsplit(".", 2)[-2]
            if not receiver.endswith(JSON_ONLY_PRETRAINED) and not _is_literal(
                _keyword(node, "use_safetensors"), True
            ):
                findings.append(Finding(at, f"call {qualified} without use_safetensors=True (may torch.load a .bin)"))
    return findings


def _python_files() -> list[Path]:
    files = [p for d in SCANNED for p in sorted((ROOT / d).rglob("*.py"))]
    return [p for p in files if not any(part.startswith(".") for part in p.relative_to(ROOT).parts)]


# -- the scanner itself must catch what it claims to ---------------------------------------------
BAD_SNIPPETS: dict[str, str] = {
    "import pickle": "import pickle\n",
    "pickle.loads": "import pickle as p\np.loads(b'')\n",
    "from pickle import": "from pickle import loads\n",
    "torch.load": "import torch\ntorch.load('x.bin')\n",
    "aliased torch.load": "from torch import load as tl\ntl('x.bin')\n",
    "torch.jit.load": "import torch\ntorch.jit.load('x.pt')\n",
    "joblib.load": "import joblib\njoblib.load('x.joblib')\n",
    "np.load allow_pickle": "import numpy as np\nnp.load('x.npy', allow_pickle=True)\n",
    "yaml.load unsafe": "import yaml\nyaml.load(open('x'), Loader=yaml.Loader)\n",
    "yaml.unsafe_load": "import yaml\nyaml.unsafe_load('a: 1')\n",
    "pandas.read_pickle": "import pandas as pd\npd.read_pickle('x.pkl')\n",
    "from_pretrained .bin": "from transformers import AutoModel\nAutoModel.from_pretrained('d')\n",
}
GOOD_SNIPPET = """
import numpy as np, yaml
from transformers import AutoConfig, AutoModel, AutoTokenizer
np.load('x.npy'); np.load('x.npy', allow_pickle=False)
yaml.safe_load('a: 1'); yaml.load('a: 1', Loader=yaml.SafeLoader)
AutoConfig.from_pretrained('d'); AutoTokenizer.from_pretrained('d')
AutoModel.from_pretrained('d', use_safetensors=True)
"""


@pytest.mark.parametrize("case", sorted(BAD_SNIPPETS))
def test_scanner_catches_each_pickle_route(case: str) -> None:
    assert scan_source(BAD_SNIPPETS[case], case), f"the scanner missed {case!r}"


def test_scanner_allows_the_safe_forms() -> None:
    assert scan_source(GOOD_SNIPPET, "good") == []


# -- the product -----------------------------------------------------------------------------------
def test_no_pickle_family_reader_in_the_optimizer_server_or_cli() -> None:
    files = _python_files()
    assert len(files) > 30, f"scanned only {len(files)} files: is ROOT {ROOT} right?"
    findings = [f for p in files for f in scan_source(p.read_text(encoding="utf-8"), str(p.relative_to(ROOT)))]
    assert findings == [], "pickle on a load path:\n" + "\n".join(map(str, findings))


class _Trap:
    """Unpickling this writes the marker file: proof that something ran the unpickler."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str, str]]:
        return (open, (str(self.marker), "w"))


_AUDIT = textwrap.dedent(
    """
    import asyncio, json, os, sys
    opened, unpickled = [], []

    def hook(event, args):
        if event == "open" and isinstance(args[0], (str, bytes)):
            opened.append(os.path.realpath(os.fsdecode(args[0])))
        elif event == "pickle.find_class":
            unpickled.append(f"{args[0]}.{args[1]}")

    sys.addaudithook(hook)
    import numpy as np
    from pruneserve.server.config import ServeConfig
    from pruneserve.server.dataplane import DataPlane
    from pruneserve.server.types import InferInput, InferRequest

    async def main():
        dp = DataPlane(ServeConfig(artifacts=[sys.argv[1]], threads=1))
        await dp.start()
        try:
            data = np.array([[b"hello world"]], dtype=object)
            response = await dp.infer(InferRequest(model="tiny-embed", version="", inputs=[InferInput("text", "BYTES", (1, 1), data)]))
            return [o.name for o in response.outputs]
        finally:
            await dp.stop(1.0)

    outputs = asyncio.run(main())
    print(json.dumps({"outputs": outputs, "opened": opened, "unpickled": unpickled}))
    """
)


def test_serving_opens_only_onnx_and_json_and_never_unpickles(embedding_artifact: Path, tmp_path: Path) -> None:
    artifact = tmp_path / "artifact"
    shutil.copytree(embedding_artifact, artifact)
    marker = tmp_path / "PWNED"
    # Files a careless loader might pick up; neither is listed in the manifest.
    for name in ("pytorch_model.bin", "model.pkl"):
        (artifact / name).write_bytes(pickle.dumps(_Trap(marker)))
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    run = subprocess.run(
        [sys.executable, "-c", _AUDIT, str(artifact)], capture_output=True, text=True, timeout=120, env=env
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["outputs"] == ["embedding"]
    assert report["unpickled"] == []
    assert not marker.exists()
    root = str(artifact.resolve())
    inside = sorted({p for p in report["opened"] if p.startswith(root + os.sep)})
    # The manifest is read and every listed file is hashed from Python, so the set is not empty.
    assert {Path(p).name for p in inside} >= {"manifest.json", "model.onnx", "tokenizer.json"}, inside
    assert all(Path(p).suffix in (".onnx", ".json", ".safetensors") for p in inside), inside
