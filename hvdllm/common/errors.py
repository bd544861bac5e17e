"""Exception types shared by every layer of hvdllm.

Every error a user can cause (bad config, bad data, a missing build) is an
:class:`HvdllmError`.  The CLI prints those as one line, without a traceback.
Anything else is a bug or a failure of the job and keeps its traceback.
"""


class HvdllmError(Exception):
    """Base class for errors caused by input or environment, not by a bug."""


class ConfigError(HvdllmError):
    """The configuration is invalid (unknown key, wrong type, bad value)."""


class NotImplementedYetError(ConfigError):
    """The configuration asks for a feature that hvdllm does not have yet."""


class DataError(HvdllmError):
    """The training data is missing, unreadable or too short."""


class CheckpointError(HvdllmError):
    """A checkpoint is missing, unreadable, or does not fit its model config."""


class EnvironmentSetupError(HvdllmError):
    """A required dependency (Horovod, MPI, a framework) is missing or broken."""


class CommError(HvdllmError):
    """A communication operation failed: mismatched shapes, dtypes or peers."""


class CommTimeoutError(CommError):
    """A blocking communication operation passed its deadline.

    The message names the operation, the group and the ranks involved, so a
    missing peer shows up as an error instead of a silent hang.
    """
