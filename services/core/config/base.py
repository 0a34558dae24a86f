"""What every config section shares: strict models (an unknown field is an error) and the error type."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

ENV_PREFIX = "AUTOINTERV__"
SAFE_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}"  # a single path component that cannot climb ("..", "/")


class ConfigError(ValueError):
    """Raised at start-up when the config is invalid; the message names each bad field."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
