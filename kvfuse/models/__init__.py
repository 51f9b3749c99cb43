"""Per-architecture knowledge as data, and tiny random models for tests."""
