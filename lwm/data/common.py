"""What every part of the data package shares: the error a bad example raises, the kinds of
problem counted in metrics, and the ConfigDict update helper of the ``get_default_config``s."""
from __future__ import annotations

from ml_collections import ConfigDict

# Kinds of bad examples; each is counted in metrics as dataset_<kind>_lines.
PROBLEM_KINDS = ("malformed_json", "missing_field", "bad_field", "bad_vision")


class DataError(ValueError):
    """A problem with one example (or a whole file); ``kind`` names its metrics counter."""

    def __init__(self, message: str, kind: str = "bad_field"):
        super().__init__(message)
        self.kind = kind


def _update_config(config: ConfigDict, updates) -> ConfigDict:
    if updates is not None:
        config.update(ConfigDict(updates).copy_and_resolve_references())
    return config
