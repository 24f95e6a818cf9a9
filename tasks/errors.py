"""Job failures that retrying cannot fix; each message is one line meant for the caller."""


def one_line(exc: BaseException) -> str:
    """An exception's message on one line, or its type's name when it has none."""
    return " ".join(str(exc).split()) or type(exc).__name__


class JobError(Exception):
    """Base of the failures a `synthesize` job reports instead of audio."""


class InvalidJobError(JobError):
    """The request itself is wrong: text, voice, format or temperature."""


class StorageError(JobError):
    """The audio could not be written to the storage directory (unwritable, full, ...)."""


class RedeliveryLimitError(JobError):
    """The job was delivered too many times: earlier attempts died with their worker process."""


class SynthesisTimeLimitError(JobError):
    """The job ran past its soft time limit."""
