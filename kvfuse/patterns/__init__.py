"""The rule library matched by the rewriter. Not implemented yet."""
