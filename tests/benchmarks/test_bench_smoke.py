"""The benchmark harness runs end to end on a tiny model, so it cannot rot.

No timing is asserted (benchmarks measure, tests check): only that every output file is
written with its columns, that the quality measures mean what they say (the reference vs
itself has fidelity 1 and is batch-invariant; dynamic INT8's answers move with the batch), that the
FLOP count matches the arithmetic, and that BENCHMARKS.md sections are replaced in place.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# `benchmarks` is a top-level folder of the repository, not an installed package: `python -m
# pytest` (make test) has the root on sys.path already, a bare `pytest` does not.
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from benchmarks import tables  # noqa: E402
from benchmarks.__main__ import run  # noqa: E402
from benchmarks._common import BenchConfig, cpu_class, default_model_dir, machine_info  # noqa: E402
from benchmarks.ceilings import model_flops  # noqa: E402
from benchmarks.model import export_original  # noqa: E402
from benchmarks.optimizer_bench import find_stage_timings  # noqa: E402
from pruneserve.artifact import Manifest, OutputSpec, write_artifact  # noqa: E402

HIDDEN, LAYERS, HEADS, FFN = 32, 2, 4, 64


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer BERT saved like a Hugging Face folder, with the default model's tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30522, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=FFN, max_position_embeddings=512,
    )  # fmt: skip
    transformers.BertModel(config, add_pooling_layer=False).eval().save_pretrained(folder)
    shutil.copy(default_model_dir() / "tokenizer.json", folder / "tokenizer.json")
    return folder


@pytest.fixture(scope="module")
def tiny_artifact(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An fp32 artifact of the tiny model written through the real artifact writer."""
    work = tmp_path_factory.mktemp("tiny-artifact")
    onnx_path = export_original(tiny_model, work / "model.onnx")
    manifest = Manifest(
        name="tiny",
        task="embedding",
        inputs=["input_ids", "attention_mask", "token_type_ids"],
        outputs=[OutputSpec("embedding", [HIDDEN])],
        max_sequence_length=512,
    )
    out = work / "artifact"
    write_artifact(out, manifest, {"model.onnx": onnx_path, "tokenizer.json": tiny_model / "tokenizer.json"})
    return out


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_model_and_scaling_end_to_end(tiny_model: Path, tiny_artifact: Path, tmp_path: Path) -> None:
    md = tmp_path / "BENCHMARKS.md"
    cls = machine_info("")["cpu_class"]  # whichever class this CPU is: the run writes into its block
    md.write_text(
        f"# B\n\nprose stays\n\n<!-- bench:{cls}:start -->\n<!-- bench:{cls}:model:start -->\nold\n"
        f"<!-- bench:{cls}:model:end -->\n<!-- bench:{cls}:end -->\n"
    )
    cfg = BenchConfig(
        mode="quick", out_dir=tmp_path / "results", only=("model", "scaling"), threads=1,
        model_dir=tiny_model, artifacts={"pruneserve-tiny": tiny_artifact}, command="pytest smoke",
    )  # fmt: skip
    assert run(cfg, md) == 0

    rows = _read_csv(cfg.out_dir / "model.csv")
    runtimes = {r["runtime"] for r in rows}
    assert {"pytorch-fp32", "ort-fp32", "ort-fp32-fused", "ort-int8-dynamic", "pruneserve-tiny"} <= runtimes
    assert {r["shape"] for r in rows} == {"b1x32", "b32x128"}
    for col in ("median_ms", "fidelity_mean", "fidelity_min", "batch_invariance_max_abs", "gflop",
                "share_int8_ceiling", "speedup_vs_pytorch", "speedup_vs_ort_int8"):  # fmt: skip
        assert all(r[col] != "" for r in rows), col
    by = {(r["runtime"], r["shape"]): r for r in rows}
    ref = by[("pytorch-fp32", "b1x32")]
    assert float(ref["fidelity_mean"]) == pytest.approx(1.0, abs=1e-9)
    assert float(ref["speedup_vs_pytorch"]) == pytest.approx(1.0)
    assert float(ref["batch_invariance_max_abs"]) < 1e-4
    # The fp32 exports compute the same function as the original.
    for name in ("ort-fp32", "ort-fp32-fused", "pruneserve-tiny"):
        assert float(by[(name, "b1x32")]["fidelity_mean"]) > 0.9999, name
    # Dynamic INT8 is approximate but close. Its closeness depends on the CPU (VNNI multiplies
    # int8 exactly, AVX2's u8s8 path saturates), so on a tiny model its fidelity can round to 1
    # in the CSV; what holds on every CPU is that its activation scales span the padded batch,
    # so a text's answer moves with its batch-mates far beyond fp32 rounding (~1e-7).
    dynamic = by[("ort-int8-dynamic", "b1x32")]
    assert 0.99 < float(dynamic["fidelity_min"]) <= 1.0
    assert float(dynamic["batch_invariance_max_abs"]) > 1e-6
    if "ort-int8-static" in runtimes:  # NNCF installed: issue 9's mode beside dynamic INT8
        static = by[("ort-int8-static", "b1x32")]
        assert float(static["fidelity_min"]) < 1.0
        assert float(static["batch_invariance_max_abs"]) < 1e-4
    assert float(by[("pruneserve-tiny", "b32x128")]["gflop"]) > float(by[("pruneserve-tiny", "b1x32")]["gflop"])
    json_rows = json.loads((cfg.out_dir / "model.json").read_text())
    assert len(json_rows) == len(rows)
    ceilings = json.loads((cfg.out_dir / "ceilings.json").read_text())
    assert ceilings["fp32_gflops"] > 0 and ceilings["int8_gops"] > 0

    scaling = _read_csv(cfg.out_dir / "scaling.csv")
    assert {r["sweep"] for r in scaling} == {"seq", "batch"}
    assert {"pytorch-fp32", "pruneserve-tiny"} <= {r["runtime"] for r in scaling}
    assert (cfg.out_dir / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    text = md.read_text()
    assert "prose stays" in text and "old" not in text
    assert "`pruneserve-tiny`" in text and f"<!-- bench:{cls}:scaling:start -->" in text
    assert text.index(f"<!-- bench:{cls}:scaling:end -->") < text.index(f"<!-- bench:{cls}:end -->")
    # A partial run stamps the sections it rewrote with its command; the machine section and
    # machine.json describe the last full run, so it leaves them alone.
    assert text.count("_Measured in a separate run: `pytest smoke`") == 3  # pruning, model, scaling
    assert "machine:start -->" not in text
    assert not (cfg.out_dir / "machine.json").exists()


def test_model_flops_match_the_arithmetic(tiny_artifact: Path) -> None:
    batch, seq = 2, 16
    per_token = LAYERS * 2 * (4 * HIDDEN * HIDDEN + 2 * HIDDEN * FFN)
    attention = LAYERS * batch * 4 * seq * seq * HIDDEN
    assert model_flops(tiny_artifact / "model.onnx", batch, seq) == batch * seq * per_token + attention


def test_update_markdown_replaces_only_named_sections(tmp_path: Path) -> None:
    md = tmp_path / "B.md"
    md.write_text(
        "intro\n<!-- bench:avx2:start -->\n<!-- bench:avx2:server:start -->\nS\n<!-- bench:avx2:server:end -->\n"
        "<!-- bench:avx2:end -->\ntail\n"
    )
    tables.update_markdown(md, {"model": "M1"}, "avx2", "AVX2")
    tables.update_markdown(md, {"model": "M2"}, "avx2", "AVX2")
    text = md.read_text()
    assert text.count("<!-- bench:avx2:model:start -->") == 1 and "M2" in text and "M1" not in text
    assert text.index("M2") < text.index("<!-- bench:avx2:end -->") < text.index("tail")
    assert "\nS\n" in text and text.startswith("intro") and "tail" in text
    with pytest.raises(ValueError, match="unknown section"):
        tables.update_markdown(md, {"nope": "x"}, "avx2", "AVX2")


def test_update_markdown_keeps_one_block_per_cpu_class(tmp_path: Path) -> None:
    md = tmp_path / "B.md"
    tables.update_markdown(md, {"server": "A1"}, "avx2", "AVX2-only CPUs")
    tables.update_markdown(md, {"server": "V1", "machine": "VM"}, "avx512-vnni-bf16", "AVX-512 VNNI + bf16 CPUs")
    tables.update_markdown(md, {"server": "V2"}, "avx512-vnni-bf16", "AVX-512 VNNI + bf16 CPUs")
    text = md.read_text()
    # Another class's run never touches this class's figures, and each class is measured once.
    assert "A1" in text and "V2" in text and "V1" not in text and "VM" in text
    assert text.count("## AVX-512 VNNI + bf16 CPUs") == 1 and text.count("## AVX2-only CPUs") == 1
    assert text.index("<!-- bench:avx2:end -->") < text.index("<!-- bench:avx512-vnni-bf16:start -->")
    assert text.index("V2") < text.index("<!-- bench:avx512-vnni-bf16:end -->")
    with pytest.raises(ValueError, match="cpu class"):
        tables.update_markdown(md, {"server": "x"}, "AVX 2", "x")


def test_cpu_class_is_the_first_whose_flags_are_present() -> None:
    assert cpu_class(["avx2", "avx512_vnni", "avx512_bf16"])[0] == "avx512-vnni-bf16"
    assert cpu_class(["avx2", "avx512_vnni"])[0] == "avx512-vnni"
    assert cpu_class(["avx", "avx2", "fma"])[0] == "avx2"
    assert cpu_class(["avx2", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16"])[0] == "amx"
    assert cpu_class([])[0] == "generic"


def test_server_targets_verdicts() -> None:
    rows = [
        {"server": "in-process", "protocol": "", "concurrency": c, "throughput_infer_s": 100.0, "p50_ms": 5.0,
         "p99_ms": 9.0}
        for c in (1, 4, 16)
    ]  # fmt: skip
    for protocol, slower in (("grpc", 1.0), ("http", 0.9)):
        for c in (1, 4, 16):
            rows += [
                {"server": "pruneserve", "protocol": protocol, "concurrency": c, "throughput_infer_s": 95.0 * slower,
                 "p50_ms": 5.5, "p99_ms": 8.0 / slower},
                {"server": "triton", "protocol": protocol, "concurrency": c, "throughput_infer_s": 70.0,
                 "p50_ms": 7.0, "p99_ms": 12.0},
            ]  # fmt: skip
    from benchmarks.server import _add_ratios

    _add_ratios(rows)
    text = tables.targets_table(rows)
    assert "gRPC: throughput at c=16 vs in-process" in text and "HTTP: throughput at c=16 vs in-process" in text
    assert "95%" in text and "1.36x" in text and "+0.50 ms" in text
    assert "86%" in text and "1.22x" in text  # HTTP: 85.5 texts/s against 100 in-process and 70 for Triton
    assert text.count("**behind**") == 1  # HTTP's 86% of in-process
    http16 = next(r for r in rows if r["server"] == "pruneserve" and r["protocol"] == "http" and r["concurrency"] == 16)
    assert http16["vs_grpc"] == pytest.approx(0.9) and http16["vs_triton"] == pytest.approx(85.5 / 70)
    grpc16 = next(r for r in rows if r["server"] == "pruneserve" and r["protocol"] == "grpc" and r["concurrency"] == 16)
    grpc16["throughput_infer_s"] = 80.0  # pruneserve over gRPC at c=16 drops to 80% of in-process
    _add_ratios(rows)
    assert tables.targets_table(rows).count("**behind**") == 3  # and 80 / 70 = 1.14x Triton < 1.2x
    section = tables.server_section(rows, [])
    assert "| pruneserve | http | 16 |" in section and "vs own gRPC" in section


def test_rows_without_a_protocol_are_grpc_rows() -> None:
    from benchmarks.server import _add_ratios

    rows = [
        {"server": "in-process", "concurrency": 16, "throughput_infer_s": 100.0, "p50_ms": 5.0, "p99_ms": 9.0},
        {"server": "pruneserve", "concurrency": 16, "throughput_infer_s": 95.0, "p50_ms": 5.5, "p99_ms": 8.0},
        {"server": "triton", "concurrency": 16, "throughput_infer_s": 70.0, "p50_ms": 7.0, "p99_ms": 12.0},
    ]
    _add_ratios(rows)
    assert rows[1]["vs_triton"] == pytest.approx(95 / 70) and rows[1]["vs_inprocess"] == pytest.approx(0.95)


def test_server_runs_time_one_engine_and_add_the_recorded_one() -> None:
    from benchmarks.server import server_runs

    on_ov = {"runtime": {"engine": "openvino", "precision": "f32"}}
    assert server_runs(("pruneserve", "triton"), on_ov) == [
        ("pruneserve", "pruneserve", ["--engine", "onnxruntime"]),
        ("triton", "triton", []),
        ("pruneserve-openvino", "pruneserve", ["--engine", "openvino"]),
    ]
    assert [r[0] for r in server_runs(("pruneserve", "triton"), {"runtime": {"engine": "onnxruntime"}})] == [
        "pruneserve", "triton"]
    assert [r[0] for r in server_runs(("triton",), on_ov)] == ["triton"]


def test_pruning_section_lists_every_recovery_stage(tmp_path: Path) -> None:
    def stage(method: str, mean: float, seconds: float) -> dict[str, object]:
        return {"method": method, "quality": {"mean_cosine": mean, "min_cosine": mean - 0.2}, "seconds": seconds}

    record = {
        "heads_per_layer": [5, 3], "ffn_per_layer": [1536, 1000], "flops": {"before": 100.0, "after": 80.0},
        "config": {"recovery": {"distill_steps": 300, "lr": 1.5e-4, "lr_schedule": "cosine"}},
        "quality": {"stages": [stage("pruned", 0.83, 0.0), stage("refit", 0.962, 37.0),
                               stage("distillation", 0.9706, 145.0)]},
    }  # fmt: skip
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "pruning.json").write_text(json.dumps(record))
    (tmp_path / "b").mkdir()  # an artifact without a pruning record is left out
    text = tables.pruning_section({"pruneserve-default": tmp_path / "a", "plain": tmp_path / "b"})
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) == 3 and all("`pruneserve-default` | 5/3 | 2536 | 20%" in r for r in rows)
    assert "| pruned | 0.8300 (0.630) |" in rows[0] and "| + refit | 0.9620 (0.762) | 37.0 |" in rows[1]
    assert "+ distillation (300 steps, cosine rate from 1.5e-04) | 0.9706 (0.771) | 145.0 |" in rows[2]
    assert "plain" not in text
    assert tables.pruning_section({"plain": tmp_path / "b"}).startswith("_No artifact")


def test_stage_timings_are_found_anywhere_in_the_manifest() -> None:
    manifest = {"name": "m", "pruning": {"stages": [{"name": "load", "seconds": 1.5, "peak_rss_mb": 300.0},
                                                   {"name": "prune", "seconds": 20, "peak_rss_mb": 900.0}]}}
    assert find_stage_timings(manifest) == [
        {"stage": "load", "seconds": 1.5, "peak_rss_mb": 300.0},
        {"stage": "prune", "seconds": 20.0, "peak_rss_mb": 900.0},
    ]
    legacy = {"config": {"stage_seconds": {"score": 1.5}}}
    assert find_stage_timings(legacy) == [{"stage": "score", "seconds": 1.5, "peak_rss_mb": None}]
    assert find_stage_timings({"latency": {"p50": "fast"}, "stages": ["x"]}) == []


def test_batch_row_drops_padding() -> None:
    from benchmarks._common import TokenBatch

    ids = np.array([[101, 7, 102, 0], [101, 8, 9, 102]])
    mask = (ids != 0).astype(np.int64)
    b = TokenBatch(ids, mask, np.zeros_like(ids), ("a", "b"))
    assert b.row(0).input_ids.tolist() == [[101, 7, 102]] and b.row(1).shape == (1, 4)


def test_artifact_runs_on_the_engine_its_manifest_recommends(tiny_artifact: Path, tmp_path: Path) -> None:
    """The harness times an artifact where ``serve --engine auto`` would run it."""
    pytest.importorskip("openvino")
    from benchmarks._common import tokenize
    from benchmarks.model import artifact_runtime
    from tokenizers import Tokenizer

    on_ov = tmp_path / "on-openvino"
    shutil.copytree(tiny_artifact, on_ov)
    manifest = json.loads((on_ov / "manifest.json").read_text())
    manifest["runtime"] = {"engine": "openvino", "precision": "f32"}
    (on_ov / "manifest.json").write_text(json.dumps(manifest))

    ort_rt = artifact_runtime("ort", tiny_artifact, threads=1)
    ov_rt = artifact_runtime("ov", on_ov, threads=1)
    assert ort_rt.note.endswith("on ONNX Runtime") and ov_rt.note.endswith("on OpenVINO")
    tok = Tokenizer.from_file(str(tiny_artifact / "tokenizer.json"))
    batch = tokenize(tok, ["a short text", "a somewhat longer text than the first one"], 32)
    np.testing.assert_allclose(ov_rt.run(batch), ort_rt.run(batch), atol=1e-4)


@pytest.mark.parametrize("mode", ["off", "run", "always"])
def test_triton_peer_session_spins_as_serve_does(tiny_artifact: Path, mode: str) -> None:
    """triton_peer.py keeps its own copy of the spinning entries (it runs in Triton's venv): they must match."""
    from pruneserve.engines.ort_settings import spinning_entries

    from benchmarks.triton_peer import ArtifactModel, parse_args

    args = parse_args([str(tiny_artifact), "--grpc-port", "1", "--http-port", "2", "--metrics-port", "3",
                       "--intra-op-spinning", mode])  # fmt: skip
    opts = ArtifactModel(args.artifact, 1, spinning=args.intra_op_spinning).session.get_session_options()
    for key, value in spinning_entries(mode).items():
        assert opts.get_session_config_entry(key) == value, key


@pytest.mark.parametrize("floor", ["engine", "transport"])
def test_floor_servers_answer_every_text_with_the_first_answer(tiny_artifact: Path, tmp_path: Path, floor: str) -> None:
    """The floor servers really skip their part: a second, different text gets the first text's answer.

    The real server, started the same way, answers the two texts differently, so the check
    would fail if the launcher did not patch anything.
    """
    tritonclient = pytest.importorskip("tritonclient.grpc")

    from benchmarks.server import ServerProcess, serving

    def answers(server: ServerProcess) -> tuple[np.ndarray, np.ndarray, list[str]]:
        client = tritonclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
        out = []
        for text in ("a short sentence", "an entirely different and somewhat longer sentence about servers"):
            inp = tritonclient.InferInput("text", [1, 1], "BYTES")
            inp.set_data_from_numpy(np.array([[text.encode()]], dtype=object))
            out.append(client.infer("tiny", [inp]).as_numpy("embedding"))
        extensions = list(client.get_server_metadata().extensions)
        client.close()
        return out[0], out[1], extensions

    with serving("pruneserve", tiny_artifact, "tiny", 1, tmp_path / "real") as real:
        first, second, extensions = answers(real)
    assert not np.allclose(first, second)
    assert "statistics" in extensions

    with serving("pruneserve", tiny_artifact, "tiny", 1, tmp_path / floor, floor=floor) as stubbed:
        floor_first, floor_second, floor_extensions = answers(stubbed)
    assert floor_first.shape == first.shape and np.isfinite(floor_first).all()
    if floor == "transport":  # the canned answer is the first request's real one
        np.testing.assert_allclose(floor_first, first, atol=1e-5)
    np.testing.assert_array_equal(floor_second, floor_first)
    assert ("statistics" in floor_extensions) == (floor == "engine")


def test_baseline_checkout_imports_pruneserve_of_that_commit() -> None:
    """``server_latency --baseline REV`` serves the old code: its package resolves to the worktree."""
    from benchmarks.server import checkout_baseline

    probe = "import pruneserve, pruneserve.server.batcher as b, pruneserve.optimizer as o; print(b.__file__); print(o.__file__)"
    with checkout_baseline("HEAD") as path:
        out = subprocess.run(
            [sys.executable, "-c", probe], cwd=path, env={**os.environ, "PYTHONPATH": str(path)},
            capture_output=True, text=True, check=True,
        ).stdout.split()
        tree = path.parent / "tree"
        assert [Path(f).resolve().is_relative_to(tree.resolve()) for f in out] == [True, True]
    assert not path.exists()


def test_inprocess_ceiling_pauses_between_batches(tiny_artifact: Path) -> None:
    """``--ceiling-pause-ms``: each batch is followed by the pause, so at most 1/pause batches a second."""
    from benchmarks.server import inprocess_ceiling

    texts = ["a short sentence", "another one", "and a third"]
    plain = inprocess_ceiling(tiny_artifact, 1, texts, 1, 0.05)
    paused = inprocess_ceiling(tiny_artifact, 1, texts, 1, 0.05, pause_s=0.02)
    assert "pause" not in plain["command"] and "20 ms pause" in paused["command"]
    assert paused["throughput_infer_s"] <= 1 / 0.02  # an upper bound the pause implies, not a speed


def test_server_bench_drives_pruneserve_over_grpc_and_http(tiny_artifact: Path, tmp_path: Path) -> None:
    """perf_analyzer, unchanged, loads the server over both protocols in one run (issue 20)."""
    from benchmarks.server import LoadSettings, run_server_bench

    cfg = BenchConfig(
        mode="quick", out_dir=tmp_path / "results", only=("server",), threads=1,
        artifacts={"pruneserve-tiny": tiny_artifact}, command="pytest smoke",
    )  # fmt: skip
    rows, notes = run_server_bench(
        cfg, cfg.artifacts, servers=("pruneserve",), concurrencies=(1, 4), settings=LoadSettings.smoke()
    )
    assert notes == []
    measured = {(r["server"], r["protocol"], r["concurrency"]) for r in rows}
    assert measured == {("in-process", "", 1), ("in-process", "", 4)} | {
        ("pruneserve", p, c) for p in ("grpc", "http") for c in (1, 4)
    }
    for r in rows:
        assert r["throughput_infer_s"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0, r
    for r in rows:
        if r["server"] == "pruneserve":
            # The server's own counters saw the load perf_analyzer sent over each protocol.
            assert r["mean_batch_size"] >= 1, r
        if r["protocol"] == "http":
            assert r["vs_grpc"] > 0, r  # compared with the same server over gRPC at the same concurrency
    saved = json.loads((cfg.out_dir / "server.json").read_text())
    assert {r["protocol"] for r in saved} == {"", "grpc", "http"}
    assert "| pruneserve | http | 4 |" in tables.server_section(rows, notes)
