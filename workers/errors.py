"""Errors of the inference layer: one base, one subclass per cause.

Callers above the executor catch `WorkerError`; the serving edge maps the subclasses to
status codes. Every message names what was wrong and, where there is one, the request.
"""


class WorkerError(Exception):
    """Base of every error raised by workers/."""


class ModelLoadError(WorkerError):
    """A model could not be found, read or converted."""


class UnsupportedModelError(ModelLoadError):
    """The model's architecture or tensor format is not one this executor runs."""


class InvalidRequestError(WorkerError):
    """A step batch or KV operation is malformed; the message names the request."""

    def __init__(self, message: str, request_index: int | None = None):
        prefix = f"request {request_index}: " if request_index is not None else ""
        super().__init__(prefix + message)
        self.request_index = request_index


class OutOfPagesError(WorkerError):
    """The KV cache has fewer free pages than were asked for."""


class PageStateError(WorkerError):
    """A page was freed twice, or used while not allocated."""
