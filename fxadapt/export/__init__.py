"""Export and reports: ONNX export, save/load, report tables, plots."""
