"""The spec: its pydantic models, parsing with source lines, and the checks of `validate`."""
