"""⑤ Deploy: `melanoma predict`, ONNX export, and `melanoma serve` with its limits, micro-batching and web page."""
