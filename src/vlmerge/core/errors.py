"""One exception family, so the CLI can print one clear line and exit non-zero."""


class VlmergeError(Exception):
    """Base class for every error vlmerge raises on bad input."""


class ConfigError(VlmergeError):
    """A configuration is malformed, has unknown fields, or is inconsistent."""


class CheckpointError(VlmergeError):
    """A checkpoint or Gram file cannot be read safely or does not have the expected content."""


class MergeError(VlmergeError):
    """The experts, seed checkpoint or Gram matrices cannot be merged as asked."""


class StudyError(VlmergeError):
    """A stage of a study failed; the message names the stage (the next run of the study retries it)."""


class OutputError(CheckpointError, OSError):
    """An output cannot be written (no such directory, no permission, disk full, a directory in the way).

    The message names the path; nothing is left at the destination. It is an OSError too, so code
    that caught the OS's error around a write still catches it."""
