"""Run a command as if on a lesser x86 CPU: AVX2 only (what Lambda x86 promises) or AVX-512 VNNI without AMX.

    PYTHONPATH=shared:. .venv/bin/python -m bench.cpu_mask avx2 -- .venv/bin/python bench/run.py --only speed

onnxruntime's int8 GEMM kernel (and numpy's, OpenBLAS's and tokenizers' SIMD paths) is picked from CPUID when
the library loads, and onnxruntime's wheel has no switch. ``bench/cpuid_mask.c``, preloaded, makes CPUID fault
and answers it with the kind's bits cleared, so the same host runs each kind's kernels side by side: the
ratios then compare kernels, not hosts. The kind's instructions still run on this host's cores (an AVX2 kernel
on a Sapphire Rapids core, not on an EPYC's), so absolute times are this host's; a real AVX2 host's figures
stay in ``bench/cpu_kinds.json`` beside them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "bench" / "cpuid_mask.c"
LIBRARY = ROOT / "build" / "cpuid_mask.so"
# /proc/cpuinfo flags the mask hides, by kind (bench.report reads the flags to name the host's int8 kernel);
# under avx2 every avx512* flag goes too
HIDDEN = {
    "avx512": ("amx_bf16", "amx_tile", "amx_int8", "amx_fp16"),
    "avx2": ("amx_bf16", "amx_tile", "amx_int8", "amx_fp16", "avx_vnni"),
}
KINDS = tuple(HIDDEN)


def library() -> Path:
    """The preload library, compiled when its source is newer (gcc; a few hundred milliseconds)."""
    if not LIBRARY.exists() or LIBRARY.stat().st_mtime < SOURCE.stat().st_mtime:
        LIBRARY.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(LIBRARY), str(SOURCE)], check=True)
    return LIBRARY


def masked_flags(flags: set[str]) -> set[str]:
    """The CPU flags a process started under ``QUANTFN_CPU_KIND`` sees (all of them without it)."""
    kind = os.environ.get("QUANTFN_CPU_KIND")
    if kind not in KINDS:
        return flags
    hidden = set(HIDDEN[kind]) | ({flag for flag in flags if flag.startswith("avx512")} if kind == "avx2" else set())
    return flags - hidden


def environment(kind: str) -> dict[str, str]:
    """This process's environment with the mask preloaded for ``kind``."""
    if kind not in KINDS:
        raise SystemExit(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    preload = " ".join(filter(None, [str(library()), os.environ.get("LD_PRELOAD", "")]))
    return {**os.environ, "LD_PRELOAD": preload, "QUANTFN_CPU_KIND": kind}


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        raise SystemExit(__doc__)
    return subprocess.run(argv[2:], env=environment(argv[0])).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
