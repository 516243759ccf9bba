"""quantfn: quantized ONNX text models served from AWS Lambda."""

from __future__ import annotations

__version__ = "0.1.0"
