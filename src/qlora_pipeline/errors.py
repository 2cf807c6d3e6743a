"""Errors a user can cause. The CLI prints their message as one line and exits non-zero."""


class PipelineError(Exception):
    """A problem with the user's input or environment, explained in one sentence with the fix."""

    exit_code = 2


class ConfigError(PipelineError):
    """A preset, override or config value that cannot work."""


class DataError(PipelineError):
    """Input data that cannot be read or that leaves nothing to train on."""


class ModelError(PipelineError):
    """A model, adapter or tokenizer that cannot be loaded or does not fit the configuration."""


class StageOrderError(PipelineError):
    """A stage was run before the stage whose outputs it needs."""


class DiskFullError(PipelineError):
    """Not enough free disk space for an artifact; the previous complete version is kept."""


def check_setting(condition: bool, key: str, value, allowed: str) -> None:
    """A config value that fails ``condition``: one line naming the key, the value and what to use."""
    if not condition:
        raise ConfigError(f"{key}={value!r} is invalid: {allowed}")
