"""Errors a user can cause. The CLIs print them as one line and exit non-zero; they never carry a traceback."""


class UserError(Exception):
    """Bad input: a malformed checkpoint, a bad option, an unavailable backend. The message names what is wrong."""


class CheckpointError(UserError):
    """A checkpoint file, tensor or config field is missing, malformed or inconsistent."""


class BackendUnavailable(UserError):
    """The selected backend cannot run here; the message says why and what is available."""


class BackendBroken(UserError):
    """A backend plugin raised while being imported or probed; the message carries its error in one line."""


class ContractError(Exception):
    """A backend breaks the operator contract (its code and manifest disagree, a bad signature). A bug, not bad input."""
