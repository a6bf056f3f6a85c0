"""edge-agent: serve ONNX models on edge servers."""

__version__ = "0.1.0"
