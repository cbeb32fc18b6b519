"""Named errors. A bad message or config fails loudly with one of these, never silently."""


class ProtocolError(ValueError):
    """A message from the wire is malformed; `reason` is a short stable name used in counters.

    `rid` is the request id the message's header carried, when its header could be read:
    the error reply then names it, and the sender's slot for that request frees at once.
    """

    def __init__(self, reason: str, detail: str, seq: int | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.seq = seq
        self.rid: int | None = None


class ConfigError(ValueError):
    """The run config is invalid; the message names every offending key."""


class ResumeMismatch(ConfigError):
    """A checkpoint holds another model than the one the config names, so resuming from it would train one model
    while the actors and the KL reference load another."""


class ModelNotFoundError(FileNotFoundError):
    """A model path or built-in model name does not resolve to a loadable folder."""


class TaskError(ValueError):
    """A task's problems or reward function cannot be loaded (missing file or field, unknown generator, bad plug-in)."""


class RoleFailed(RuntimeError):
    """A role stopped itself for a named reason; launch.py prints it and exits non-zero."""


class GenerationFailuresExceeded(RoleFailed):
    """Too many generations failed within the configured window (actor.max_generation_failures)."""


class WeightTransferError(ProtocolError):
    """A weight transfer failed (`reason`: bad_manifest, size, checksum, incomplete, timeout, ...); the old weights stay."""


class PeerRefused(RuntimeError):
    """The peer answered a request with an ERROR naming `reason` (e.g. internal_error, too_large)."""

    def __init__(self, endpoint: str, reason: str, detail: str) -> None:
        super().__init__(f"{endpoint} refused the request: {reason}: {detail}")
        self.reason = reason
        self.detail = detail
