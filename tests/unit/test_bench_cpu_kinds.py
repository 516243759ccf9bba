"""`make bench` keeps speed figures per CPU kind: a run replaces its own kind's row and keeps the others."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.report import by_cpu_kind, int8_kernel


def test_given_a_cpu_flag_set_when_named_then_the_kernel_mlas_picks_is_named() -> None:
    assert int8_kernel({"avx2", "fma"}).startswith("AVX2 without VNNI")
    assert int8_kernel({"avx2", "avx512f", "avx512bw", "avx512_vnni"}).startswith("AVX-512 VNNI")
    assert int8_kernel({"avx2", "avx512_vnni", "amx_int8"}).startswith("AMX")


def test_given_figures_of_two_kinds_when_a_run_reports_then_only_its_kind_changes(tmp_path: Path) -> None:
    path = tmp_path / "kinds.json"
    avx2 = {"cpu": "EPYC", "date": "2026-12-06", "throughput_ratio_vs_ort_fp32_1_thread": 1.48}
    path.write_text(json.dumps({int8_kernel({"avx2"}): avx2, "AMX (old)": {"cpu": "x"}}))
    host = {"int8_kernel": "AMX (old)", "cpu": "Xeon", "date": "2026-12-07T12:00:00+00:00"}
    rows = by_cpu_kind(host, {"throughput_ratio_vs_ort_fp32_1_thread": 2.3, "recall_at_5": 0.95}, path)
    kept = json.loads(path.read_text())
    assert kept[int8_kernel({"avx2"})] == avx2
    assert kept["AMX (old)"]["cpu"] == "Xeon" and kept["AMX (old)"]["throughput_ratio_vs_ort_fp32_1_thread"] == 2.3
    assert "recall_at_5" not in kept["AMX (old)"] and len(rows) == 2


def _cpuid_faulting() -> bool:
    import shutil

    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " cpuid_fault" in flags and " avx2" in flags and shutil.which("gcc") is not None


MASKED_PROBE = """
import json, numpy as np, onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from numpy._core._multiarray_umath import __cpu_features__ as features
rng = np.random.default_rng(0)
weights = rng.integers(-128, 128, (256, 64)).astype(np.int8)   # full-range int8: 16-bit pair sums can saturate
graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "w"], ["y"])], "g",
    [helper.make_tensor_value_info("a", TensorProto.UINT8, [None, 256])],
    [helper.make_tensor_value_info("y", TensorProto.INT32, [None, 64])], [numpy_helper.from_array(weights, "w")])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
a = rng.integers(200, 256, (64, 256)).astype(np.uint8)
error = int(np.abs(session.run(None, {"a": a})[0] - a.astype(np.int64) @ weights.astype(np.int64)).max())
print(json.dumps({"avx512f": bool(features["AVX512F"]), "avx2": bool(features["AVX2"]), "u8s8_error": error}))
"""


@pytest.mark.skipif(not _cpuid_faulting(), reason="needs an x86 CPU with CPUID faulting (cpuid_fault) and gcc")
def test_given_the_avx2_mask_when_onnxruntime_loads_then_it_runs_the_avx2_kernel_that_saturates_pair_sums() -> None:
    import subprocess
    import sys

    from bench import cpu_mask

    ran = subprocess.run(
        [sys.executable, "-c", MASKED_PROBE],
        env=cpu_mask.environment("avx2"),
        capture_output=True,
        text=True,
        check=True,
    )
    seen = json.loads(ran.stdout)
    # numpy sees no AVX-512, and onnxruntime's u8 x s8 kernel is vpmaddubsw's: full-range weights saturate
    assert seen["avx2"] and not seen["avx512f"]
    assert seen["u8s8_error"] > 0
    with pytest.raises(SystemExit, match="kind must be one of"):
        cpu_mask.environment("sse")


def test_given_a_kind_when_flags_are_masked_then_the_kernel_named_is_the_kinds(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench.cpu_mask import masked_flags

    flags = {"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "amx_tile"}
    monkeypatch.setenv("QUANTFN_CPU_KIND", "avx2")
    assert int8_kernel(masked_flags(flags)).startswith("AVX2 without VNNI")
    monkeypatch.setenv("QUANTFN_CPU_KIND", "avx512")
    assert int8_kernel(masked_flags(flags)).startswith("AVX-512 VNNI")
    monkeypatch.delenv("QUANTFN_CPU_KIND")
    assert int8_kernel(masked_flags(flags)).startswith("AMX")
