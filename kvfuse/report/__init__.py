"""Reports about ONNX models: summaries now, graph diffs to come."""
