"""`make bench` keeps speed figures per CPU kind: a run replaces its own kind's row and keeps the others."""

from __future__ import annotations

import json
from pathlib import Path

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
