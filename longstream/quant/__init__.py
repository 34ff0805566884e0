"""Number formats and quantized compute: NVFP4 / FP8 codecs, Hadamard transform, quantized linears.

Inference: `QuantLinear`, `quantize_model`, `quant_summary`, `save_quantized`, `load_quantized`.
Training: `NVFP4TrainingLinear`, `FP8TrainingLinear`, `convert_for_training`.
"""

from .linear import DEFAULT_SKIP, MODES, QuantError, QuantLinear, QuantSummary, quant_summary, quantize_model
from .serialize import QuantFileError, load_quantized, save_quantized
from .training import (
    FP8TrainingLinear,
    NVFP4TrainingConfig,
    NVFP4TrainingLinear,
    convert_for_training,
    fp8_linear,
    nvfp4_linear,
    training_summary,
)

__all__ = [
    "DEFAULT_SKIP",
    "MODES",
    "QuantError",
    "QuantLinear",
    "QuantSummary",
    "quant_summary",
    "quantize_model",
    "QuantFileError",
    "load_quantized",
    "save_quantized",
    "FP8TrainingLinear",
    "NVFP4TrainingConfig",
    "NVFP4TrainingLinear",
    "convert_for_training",
    "fp8_linear",
    "nvfp4_linear",
    "training_summary",
]
