"""The onnxruntime session wrapper and generation loop. Not implemented yet."""
