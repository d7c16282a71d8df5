"""One error hierarchy: every error a user can hit carries a one-line message and an exit code."""

from __future__ import annotations


class DstackError(Exception):
    """Base of all user-facing errors; `message` is one line, `exit_code` is what the CLI exits with."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message} — {hint}")

    def __str__(self) -> str:
        return self.message if self.hint is None else f"{self.message} — {self.hint}"


class ConfigError(DstackError):
    """`.dstack/` is malformed: bad YAML, unknown fields, wrong types, bad variables."""

    exit_code = 2

    def __init__(
        self, message: str, *, file: str | None = None, line: int | None = None, hint: str | None = None
    ) -> None:
        self.file = file
        self.line = line
        where = file if line is None else f"{file}:{line}"
        super().__init__(f"{where}: {message}" if file else message, hint=hint)


class RepoError(DstackError):
    """Not a Git repo, no `.dstack/` folder, or the repo state can't be read."""

    exit_code = 2


class UsageError(DstackError):
    """A command's arguments are wrong (unknown variable, unknown workflow, bad option value)."""

    exit_code = 2


class NotFoundError(DstackError):
    """A run, job, tag, host or artifact the user named does not exist (or a prefix is ambiguous)."""

    exit_code = 3


class RunError(DstackError):
    """A run failed: a job exited non-zero, was stopped, or could not be placed."""

    exit_code = 4


class ArtifactError(DstackError):
    """An artifact is missing, corrupted (digest mismatch) or would escape its target directory."""

    exit_code = 5


class HostError(DstackError):
    """A runner host can't be reached, refused our key, changed its host key, or lacks what a job needs."""

    exit_code = 6


class RemoteCommandError(HostError):
    """A command on a host exited non-zero: carries the host, command, exit code and output tail."""

    def __init__(self, host: str, command: str, exit_code: int, output: str) -> None:
        self.host = host
        self.command = command
        self.returncode = exit_code
        self.output = output
        tail = " | ".join(output.strip().splitlines()[-3:])
        super().__init__(f"{host}: `{command}` exited with {exit_code}" + (f": {tail}" if tail else ""))


class StorageError(DstackError):
    """The artifact store (local or S3) can't be read or written."""

    exit_code = 7


class CloudError(DstackError):
    """The cloud API refused or failed (limits, credentials, capacity)."""

    exit_code = 8
