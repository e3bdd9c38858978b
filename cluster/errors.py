"""Errors of the inferlet runtime: one base, one subclass per cause."""


class InferletError(Exception):
    """Base of every error the inferlet runtime raises."""


class BuildError(InferletError):
    """An inferlet's source could not be built into a component; the message has its file and line."""


class InvalidComponentError(InferletError):
    """A .wasm file is not a component of the inferlet world (bad bytes, oversized, missing export)."""


class InferletFailed(InferletError):
    """The inferlet ended with an error: its own exception and traceback, a trap, or a limit."""


class GrammarError(InferletError):
    """A grammar could not be compiled, or a token was fed that the grammar does not allow."""


class MessagingError(InferletError):
    """A message, queue or key-value store operation was refused (size, capacity, bad name)."""


class HttpDenied(InferletError):
    """An inferlet's HTTP request names a host the deployment does not allow."""


class HttpFailed(InferletError):
    """An allowed HTTP request failed: connection error, timeout, or a response over the size limit."""


class ProgramTooLarge(InferletError):
    """An uploaded program is over the server's size limit."""


class UnknownProgram(InferletError):
    """No program with this id was uploaded to this server."""


class UnknownInferlet(InferletError):
    """No inferlet with this instance id runs (or recently ran) on this server."""


class HostBusy(InferletError):
    """The server already runs as many inferlets as it allows."""


class NoLiveHost(InferletError):
    """Cluster mode: no inferlet host takes inferlets now (none up, or all draining or silent)."""


# -- the KV-page directory (cluster mode; raised through both modes' client APIs) --------------

class DirectoryError(InferletError):
    """Base of every error the KV-page directory raises."""


class InvalidDirectoryRequest(DirectoryError):
    """An argument is malformed: a bad name, a page out of range, more tokens than pages hold."""


class ExportNameTaken(DirectoryError):
    """The export name is already in use somewhere in the cluster."""


class UnknownExport(DirectoryError):
    """Nothing is exported under this name."""


class NotExportOwner(DirectoryError):
    """A non-persistent export may be unexported only by the inferlet that exported it."""


class UnknownWorker(DirectoryError):
    """No worker with this id has registered (or it was forgotten)."""


class WorkerDead(DirectoryError):
    """The worker is registered but marked dead; it must register again to be used."""


class NoLiveWorker(DirectoryError):
    """No live worker is registered, so nothing can be placed."""


class UnknownOwner(DirectoryError):
    """No running inferlet with this instance id is known to the directory."""


class OwnerExists(DirectoryError):
    """An inferlet with this instance id is already running."""


class DirectoryUnavailable(DirectoryError):
    """The directory cannot be reached (its actor is down or restarting)."""


class DirectoryInvariantBroken(DirectoryError):
    """The directory's own bookkeeping disagrees with itself: a bug, never a user error."""


class ExportNotMovable(DirectoryError):
    """The export cannot be moved to another worker now: it is not persistent (its pages live with the
    running inferlet that exported it), or a move of it is already in flight. The message says which."""


class InferletNotMovable(DirectoryError):
    """A running inferlet cannot move to another worker now: it has non-persistent exports (their pages
    are shared where they are), an import's copy or a pass that did not finish in time, or it ended. The
    message says which."""


class UnknownMove(DirectoryError):
    """No move with this id is in flight: it finished or was aborted, or it was cancelled because its
    export ended or its source or destination worker died."""
