from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Empty(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UploadChunk(_message.Message):
    __slots__ = ("data", "sha256", "total_size")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    sha256: str
    total_size: int
    def __init__(self, data: _Optional[bytes] = ..., sha256: _Optional[str] = ..., total_size: _Optional[int] = ...) -> None: ...

class ProgramRef(_message.Message):
    __slots__ = ("program_id", "size", "already_present")
    PROGRAM_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    ALREADY_PRESENT_FIELD_NUMBER: _ClassVar[int]
    program_id: str
    size: int
    already_present: bool
    def __init__(self, program_id: _Optional[str] = ..., size: _Optional[int] = ..., already_present: _Optional[bool] = ...) -> None: ...

class LaunchRequest(_message.Message):
    __slots__ = ("program_id", "arguments", "prompt_hint", "tenant")
    PROGRAM_ID_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_HINT_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    program_id: str
    arguments: _containers.RepeatedScalarFieldContainer[str]
    prompt_hint: str
    tenant: str
    def __init__(self, program_id: _Optional[str] = ..., arguments: _Optional[_Iterable[str]] = ..., prompt_hint: _Optional[str] = ..., tenant: _Optional[str] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("started", "message", "finished", "failed", "seq")
    STARTED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    started: Started
    message: Message
    finished: Finished
    failed: Failed
    seq: int
    def __init__(self, started: _Optional[_Union[Started, _Mapping]] = ..., message: _Optional[_Union[Message, _Mapping]] = ..., finished: _Optional[_Union[Finished, _Mapping]] = ..., failed: _Optional[_Union[Failed, _Mapping]] = ..., seq: _Optional[int] = ...) -> None: ...

class Started(_message.Message):
    __slots__ = ("instance_id", "owner_token")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    owner_token: str
    def __init__(self, instance_id: _Optional[str] = ..., owner_token: _Optional[str] = ...) -> None: ...

class AttachRequest(_message.Message):
    __slots__ = ("instance_id", "owner_token", "from_seq")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FROM_SEQ_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    owner_token: str
    from_seq: int
    def __init__(self, instance_id: _Optional[str] = ..., owner_token: _Optional[str] = ..., from_seq: _Optional[int] = ...) -> None: ...

class Message(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...

class Finished(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Failed(_message.Message):
    __slots__ = ("error",)
    ERROR_FIELD_NUMBER: _ClassVar[int]
    error: str
    def __init__(self, error: _Optional[str] = ...) -> None: ...

class SendRequest(_message.Message):
    __slots__ = ("instance_id", "text")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    text: str
    def __init__(self, instance_id: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class TerminateRequest(_message.Message):
    __slots__ = ("instance_id",)
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    def __init__(self, instance_id: _Optional[str] = ...) -> None: ...

class InferletList(_message.Message):
    __slots__ = ("inferlets",)
    INFERLETS_FIELD_NUMBER: _ClassVar[int]
    inferlets: _containers.RepeatedCompositeFieldContainer[InferletInfo]
    def __init__(self, inferlets: _Optional[_Iterable[_Union[InferletInfo, _Mapping]]] = ...) -> None: ...

class InferletInfo(_message.Message):
    __slots__ = ("instance_id", "program_id", "seconds_running")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    PROGRAM_ID_FIELD_NUMBER: _ClassVar[int]
    SECONDS_RUNNING_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    program_id: str
    seconds_running: float
    def __init__(self, instance_id: _Optional[str] = ..., program_id: _Optional[str] = ..., seconds_running: _Optional[float] = ...) -> None: ...

class HealthReply(_message.Message):
    __slots__ = ("status", "model", "free_pages", "total_pages", "running", "cached_pages")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FREE_PAGES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_PAGES_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    CACHED_PAGES_FIELD_NUMBER: _ClassVar[int]
    status: str
    model: str
    free_pages: int
    total_pages: int
    running: int
    cached_pages: int
    def __init__(self, status: _Optional[str] = ..., model: _Optional[str] = ..., free_pages: _Optional[int] = ..., total_pages: _Optional[int] = ..., running: _Optional[int] = ..., cached_pages: _Optional[int] = ...) -> None: ...
