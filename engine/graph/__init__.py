"""The graph: the IR, the builder that expands a spec into primitives, and the reversal."""
