"""User-facing errors: one actionable line each; `launch.py` prints it and exits non-zero."""


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing corpus, mismatched store...)."""


class ConfigError(UserError):
    """An invalid config value; the message names the field."""


class DataError(UserError):
    """A corpus or tokenizer that cannot be read, or token ids outside the vocabulary."""


class CheckpointError(UserError):
    """No usable checkpoint (missing, truncated or corrupt)."""


class StoreError(UserError):
    """A LUT / expert store that is missing, corrupt or does not match its checkpoint."""


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def require(cond: bool, msg: str) -> None:
    """Raises ConfigError(msg) unless `cond`: one line naming the field, for `validate`."""
    if not cond:
        raise ConfigError(msg)


def require_one_of(value, options, field: str) -> None:
    require(value in options, f"{field}={value!r}: use one of {'|'.join(map(str, options))}")
