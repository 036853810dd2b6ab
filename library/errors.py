"""User-facing errors: scripts print these as one message and exit non-zero, never a traceback."""


class UserError(Exception):
    """An error caused by the user's input (config, flag, file) whose message says what to fix."""


class ConfigError(UserError):
    """A dataset or run config is invalid. The message names the file, the table and the key."""

    def __init__(self, message: str, *, file: str | None = None, table: str | None = None, key: str | None = None):
        parts = []
        if file:
            parts.append(str(file))
        if table:
            parts.append(table)
        if key:
            parts.append(f"key '{key}'")
        prefix = ": ".join([" / ".join(parts)]) if parts else ""
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.file, self.table, self.key = file, table, key


class ModelLoadError(UserError):
    """A model file is missing, of the wrong family, or lacks keys."""
