"""The rewriting engine (pipeline, layouts, verification). Not implemented yet."""
