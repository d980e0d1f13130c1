"""Export a calibrated model for deployment: ONNX QDQ (TensorRT explicit quantization, onnxruntime),
AIMET/QNN encodings (format 2.0.0), and a TensorRT per-tensor dynamic-range table.

``quantcore.api.export`` / ``quantcore export`` run all of them from a checkpoint (:mod:`.run`).
"""
from .onnx_qdq import (DEFAULT_OPSET, ExportError, OnnxExport, QdqSpec, check_model, export_onnx, float_graph,
                       graph_quantizers, ort_session, plan_export, qdq_export)

__all__ = ["DEFAULT_OPSET", "ExportError", "OnnxExport", "QdqSpec", "check_model", "export_onnx", "float_graph",
           "graph_quantizers", "ort_session", "plan_export", "qdq_export"]
