"""The images: Dockerfiles checked statically, and the install scripts they RUN executed here.

No Docker engine runs on CI, so each Dockerfile delegates every install step to a script in
deploy/scripts/, and these tests run those scripts for real (into a temporary venv): what
the image build does is what CI verified.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pruneserve.server.config import ServeConfig

from deploy_support import DEPLOY, REPO, one, render

DOCKER = DEPLOY / "docker"
SCRIPTS = DEPLOY / "scripts"
DOCKERFILES = {
    "server-cpu": DOCKER / "server-cpu.Dockerfile",
    "server-gpu": DOCKER / "server-gpu.Dockerfile",
    "optimizer": DOCKER / "optimizer.Dockerfile",
}


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines: list[tuple[str, str]] = []
    buffer = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        stripped = raw.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        buffer += " " + stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            word, _, rest = buffer.strip().partition(" ")
            lines.append((word.upper(), rest.strip()))
            buffer = ""
    return lines


def _args(instructions: list[tuple[str, str]]) -> dict[str, str]:
    return {k: v for word, rest in instructions if word == "ARG" and "=" in rest for k, v in [rest.split("=", 1)]}


def _stages(instructions: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for item in instructions:
        if item[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(item)
    return stages


def _dockerignore() -> list[str]:
    text = (REPO / ".dockerignore").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _ignored(relative: str, patterns: list[str]) -> bool:
    from fnmatch import fnmatch

    parts = Path(relative).parts
    for pattern in patterns:
        bare = pattern.removeprefix("**/")
        for i in range(len(parts)):
            prefix = "/".join(parts[: i + 1])
            if fnmatch(prefix, pattern) or (pattern.startswith("**/") and fnmatch(parts[i], bare)):
                return True
    return False


# -- static checks ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_is_multi_stage_pinned_and_non_root(name: str) -> None:
    instructions = _instructions(DOCKERFILES[name])
    args = _args(instructions)
    stages = _stages(instructions)
    assert len(stages) >= 2, "build tools must stay out of the runtime stage"
    for stage in stages:
        image = stage[0][1].split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        if ":" not in image:  # FROM <earlier stage>
            assert image in {s[0][1].split()[-1] for s in stages}
            continue
        tag = image.rsplit(":", 1)[1]
        assert tag != "latest" and re.search(r"\d+\.\d+\.\d+", tag), f"{name}: base image {image} is not pinned"
    # The runtime stage (`server`, which `server-baked` extends, or `optimizer`) drops root.
    runtime = next(s for s in stages if s[0][1].endswith((" AS server", " AS optimizer")))
    users = [rest for word, rest in runtime if word == "USER"]
    assert users and users[-1] == "10001:10001"
    pod_user = one(render("overlays/cpu"), "Deployment")["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    assert int(users[-1].split(":")[0]) == pod_user
    env = " ".join(rest for word, rest in instructions if word == "ENV")
    assert "HOME=/tmp" in env and "PYTHONDONTWRITEBYTECODE=1" in env  # read-only root fs
    entrypoint = next(rest for word, rest in instructions if word == "ENTRYPOINT")
    assert json.loads(entrypoint) == ["pruneserve"]
    # Installs happen only through the scripts the tests below execute.
    for word, rest in instructions:
        if word == "RUN":
            assert "pip install" not in rest, f"{name}: install through deploy/scripts, not inline pip"


@pytest.mark.parametrize("name", ["server-cpu", "server-gpu"])
def test_server_images_expose_the_configured_ports(name: str) -> None:
    instructions = _instructions(DOCKERFILES[name])
    exposed = {int(p) for word, rest in instructions if word == "EXPOSE" for p in rest.split()}
    defaults = ServeConfig()
    assert exposed == {defaults.http_port, defaults.grpc_port, defaults.metrics_port}
    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    flavor = name.split("-")[1]
    assert f"deploy/scripts/install-server.sh --venv /opt/pruneserve --flavor {flavor}" in runs
    targets = [rest.split()[-1] for word, rest in instructions if word == "FROM"]
    assert "server-baked" in targets  # the artifact-baked-in variant


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_copied_paths_exist_and_are_in_the_build_context(name: str) -> None:
    patterns = _dockerignore()
    assert ".venv" in patterns and ".git" in patterns
    for word, rest in _instructions(DOCKERFILES[name]):
        if word != "COPY" or "--from=" in rest:
            continue
        sources = [s for s in rest.split()[:-1] if not s.startswith("--")]
        for source in sources:
            if "${" in source:  # the baked artifact: a build argument
                continue
            assert (REPO / source).exists(), f"{name}: COPY {source} does not exist"
            assert not _ignored(source.rstrip("/"), patterns), f"{name}: COPY {source} is excluded by .dockerignore"
    assert not _ignored("artifacts/minilm", patterns), "server-baked targets copy from artifacts/"


def test_constraints_pin_the_versions_this_suite_runs() -> None:
    """The images' pins are the versions of the server stack under test here."""
    from importlib.metadata import version

    pins = {}
    for line in (DOCKER / "constraints.txt").read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            name, _, pinned = line.partition("==")
            pins[name.lower()] = pinned
    for package in ("onnxruntime", "grpcio", "protobuf", "tokenizers", "numpy", "prometheus-client", "aiohttp"):
        assert pins[package] == version(package).split("+")[0], package
    assert pins["onnxruntime-gpu"] == pins["onnxruntime"]  # same graph optimizations on CPU and GPU


def test_optimizer_image_brings_nncf_with_everything_it_needs_pinned() -> None:
    """Static INT8 through NNCF (``--target tensorrt``, ``--quantize auto``) needs the openvino extra in
    the optimizer image; every package it brings is pinned, at the version under test where installed."""
    import tomllib
    from importlib.metadata import PackageNotFoundError, requires, version

    from packaging.requirements import Requirement

    script = (SCRIPTS / "install-optimizer.sh").read_text(encoding="utf-8")
    extras = re.search(r'^extras="([^"]+)"', script, re.MULTILINE)
    assert extras and "openvino" in extras.group(1).split(","), "install-optimizer.sh installs no openvino extra"
    assert script.count('"${src}[${extras}]"') == 2  # the dry run resolves what the install installs
    assert re.search(r"import [^\n]*\bnncf\b", script), "the script's own check does not import nncf"
    pins = {
        re.sub(r"[-_.]+", "-", name).lower(): pinned
        for line in (DOCKER / "constraints.txt").read_text(encoding="utf-8").splitlines()
        if line and not line.startswith("#")
        for name, _, pinned in [line.partition("==")]
    }
    extra = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    todo = [Requirement(r).name for r in extra["openvino"]]
    assert "nncf" in todo
    seen: set[str] = set()
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        seen.add(name)
        assert name in pins, f"constraints.txt does not pin {name}, which the openvino extra brings"
        try:
            installed = version(name)
        except PackageNotFoundError:
            continue  # its own requirements are read from an installed copy only
        assert pins[name] == installed.split("+")[0], name
        for raw in requires(name) or []:
            requirement = Requirement(raw)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)


@pytest.mark.slow
def test_gpu_base_image_matches_onnxruntime_gpu_cuda_major(tmp_path: Path) -> None:
    """The CUDA image's major is the one the pinned onnxruntime-gpu wheel requires (from its
    published metadata), and the TensorRT packages are built for the same CUDA major."""
    pins = dict(
        line.split("==", 1)
        for line in (DOCKER / "constraints.txt").read_text(encoding="utf-8").splitlines()
        if "==" in line and not line.startswith("#")
    )
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed", "-q",
         "--report", str(report), f"onnxruntime-gpu=={pins['onnxruntime-gpu']}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if result.returncode != 0:
        pytest.skip(f"the package index is unreachable: {result.stderr.strip()[-300:]}")
    requires = json.loads(report.read_text())["install"][0]["metadata"].get("requires_dist", [])
    cuda = [r for r in requires if r.startswith("nvidia-cuda-runtime")]
    assert cuda, requires
    match = re.search(r"-cu(\d+)|~=(\d+)", cuda[0])
    assert match
    ort_major = match.group(1) or match.group(2)
    args = _args(_instructions(DOCKERFILES["server-gpu"]))
    image_major = re.search(r":(\d+)\.\d+\.\d+-cudnn-runtime", args["CUDA_IMAGE"])
    assert image_major and image_major.group(1) == ort_major
    trt = re.search(r"TRT_VERSION:-[\d.]+-1\+cuda(\d+)\.", (SCRIPTS / "install-tensorrt-runtime.sh").read_text())
    assert trt and trt.group(1) == ort_major


# -- the scripts, executed -------------------------------------------------------------------------
@pytest.mark.slow
def test_install_server_script_builds_a_torch_free_server(tmp_path: Path) -> None:
    """What server-cpu.Dockerfile RUNs: a venv where `pruneserve serve` works without torch."""
    venv = tmp_path / "venv"
    result = subprocess.run(
        ["bash", str(SCRIPTS / "install-server.sh"), "--venv", str(venv), "--flavor", "cpu", "--src", str(REPO),
         "--python", sys.executable],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    python = venv / "bin" / "python"
    # Checked again here, independently of the script's own check.
    probe = subprocess.run(
        [str(python), "-c", "import importlib.util as u, pruneserve.server.app; "
         "print(u.find_spec('torch') is None, u.find_spec('transformers') is None)"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == ["True", "True"]
    help_text = subprocess.run(
        [str(venv / "bin" / "pruneserve"), "serve", "--help"], capture_output=True, text=True, cwd=tmp_path
    )
    assert help_text.returncode == 0 and "--grpc-port" in help_text.stdout
    # A real install, not a link back to this checkout.
    location = subprocess.run(
        [str(python), "-c", "import pruneserve; print(pruneserve.__file__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert str(venv) in location.stdout


def test_install_server_script_refuses_an_unknown_flavor(tmp_path: Path) -> None:
    result = subprocess.run(
        ["bash", str(SCRIPTS / "install-server.sh"), "--venv", str(tmp_path / "v"), "--flavor", "tpu"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--flavor must be cpu or gpu" in result.stderr
    assert not (tmp_path / "v").exists()


@pytest.mark.slow
def test_install_optimizer_script_resolves(tmp_path: Path) -> None:
    """What optimizer.Dockerfile RUNs resolves against the pins (a dry run: no multi-GB install)."""
    result = subprocess.run(
        ["bash", str(SCRIPTS / "install-optimizer.sh"), "--venv", str(tmp_path / "venv"), "--src", str(REPO),
         "--python", sys.executable, "--dry-run"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "dry run resolved" in result.stdout


# -- install-system-deps.sh (run by `make test`) -----------------------------------------------------
def _run_system_deps(packages: str, *, as_nobody: bool = False) -> subprocess.CompletedProcess[str]:
    script = SCRIPTS / "install-system-deps.sh"
    if not as_nobody:
        env = {**os.environ, "PRUNESERVE_SYSTEM_PACKAGES": packages}
        return subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=600, env=env)
    # uid 65534 may not read the checkout (a clone inside a 0700 folder: `mktemp -d`, many
    # home folders), nor pytest's tmp_path: run a copy from a folder anyone can read, there.
    with tempfile.TemporaryDirectory(prefix="pruneserve-system-deps-") as folder:
        os.chmod(folder, 0o755)
        copy = Path(folder) / script.name
        shutil.copyfile(script, copy)
        os.chmod(copy, 0o644)
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "bash", str(copy)]
        env = {**os.environ, "PRUNESERVE_SYSTEM_PACKAGES": packages, "HOME": folder, "TMPDIR": folder}
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=folder)


def test_system_deps_is_a_quiet_no_op_when_present() -> None:
    result = _run_system_deps("bash coreutils")
    assert result.returncode == 0
    assert result.stdout == result.stderr == ""


def test_system_deps_never_fails_the_build_without_root() -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run the script as an unprivileged user")
    result = _run_system_deps("bash pruneserve-no-such-package", as_nobody=True)
    assert result.returncode == 0
    assert "not root" in result.stderr and "pruneserve-no-such-package" in result.stderr


@pytest.mark.slow
def test_system_deps_reports_but_survives_an_uninstallable_package() -> None:
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("needs root and apt-get")
    policy = Path("/usr/sbin/policy-rc.d")
    before = policy.read_text() if policy.exists() else None
    result = _run_system_deps("pruneserve-no-such-package")
    assert result.returncode == 0
    assert "failed" in result.stderr
    # The temporary "start no services" policy is removed again (or the original kept).
    assert (policy.read_text() if policy.exists() else None) == before
