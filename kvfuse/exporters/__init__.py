"""Export Hugging Face causal LMs (directories, GGUF files, the bundled default) with Optimum."""
