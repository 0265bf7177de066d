"""sgs_fx: Spatial Gradient Scaling (Detkov et al., ICLR 2023) as a torch.fx pass for any PyTorch model.

    model = sgs_fx.transform(model)              # every selected conv's weight gradient is scaled by S
    sched = sgs_fx.MIScheduler(model, loader)    # S from the mutual information of each conv's input
    plain = sgs_fx.strip(model)                  # a plain model again, same state_dict keys
    sgs_fx.export_onnx(plain, "model.onnx", x)   # checked with onnxruntime

    qat = sgs_fx.transform(sgs_fx.prepare_qat(model, x))   # INT8: QAT with SGS; or sgs_fx.quantize_ptq
    sgs_fx.export_onnx(qat, "int8.onnx", x)                 # QDQ ONNX, int8 weights, checked by onnxruntime
"""
from .export.onnx import ExportMismatchError, ExportReport, export_onnx
from .export.qdq import UnsupportedQuantizationError
from .backward import scale_grad
from .passes.instrument import transform
from .passes.registry import get_scales, instrumented, set_scales
from .passes.strip import strip
from .quant import freeze, prepare_qat, qconfig_mapping, quantize_ptq
from .scaling.mi import dependence
from .scaling.equivalence import equivalent_scales
from .scaling.scheduler import MIScheduler
from .step import scale_gradients
from .verify import VerifyReport, verify

__all__ = ["transform", "instrumented", "get_scales", "set_scales", "strip", "scale_grad", "dependence", "MIScheduler",
           "scale_gradients",
           "export_onnx", "ExportReport", "ExportMismatchError", "UnsupportedQuantizationError",
           "prepare_qat", "quantize_ptq", "qconfig_mapping", "freeze",
           "equivalent_scales", "verify", "VerifyReport"]
__version__ = "0.1.0"
