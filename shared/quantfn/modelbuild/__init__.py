"""The model build pipeline: export the fp32 graph, quantize, evaluate, publish.

Heavy dependencies (onnx, onnxruntime.quantization) are imported inside
functions; the Lambda functions never import this package.
"""

from __future__ import annotations

from quantfn.modelbuild.errors import BuildError, BuildGateError
from quantfn.modelbuild.gate import Gate
from quantfn.modelbuild.pipeline import DEFAULT_MODEL_ID, build_model
from quantfn.modelbuild.recipes import RECIPES, Recipe

__all__ = ["DEFAULT_MODEL_ID", "RECIPES", "BuildError", "BuildGateError", "Gate", "Recipe", "build_model"]
