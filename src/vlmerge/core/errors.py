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
