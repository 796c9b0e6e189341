import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from patchport.v1 import common_pb2 as _common_pb2
from patchport.v1 import ports_pb2 as _ports_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LeaseJobRequest(_message.Message):
    __slots__ = ("worker_id", "loaded_base_digests", "wait_seconds", "device", "max_jobs")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    LOADED_BASE_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MAX_JOBS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    loaded_base_digests: _containers.RepeatedScalarFieldContainer[str]
    wait_seconds: int
    device: str
    max_jobs: int
    def __init__(self, worker_id: _Optional[str] = ..., loaded_base_digests: _Optional[_Iterable[str]] = ..., wait_seconds: _Optional[int] = ..., device: _Optional[str] = ..., max_jobs: _Optional[int] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("job_id", "fencing_token", "lease_expires_at", "attempt", "method_version", "patch", "source_base", "target_base", "merged", "reused_tensors", "patch_file_bytes")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    FENCING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    METHOD_VERSION_FIELD_NUMBER: _ClassVar[int]
    PATCH_FIELD_NUMBER: _ClassVar[int]
    SOURCE_BASE_FIELD_NUMBER: _ClassVar[int]
    TARGET_BASE_FIELD_NUMBER: _ClassVar[int]
    MERGED_FIELD_NUMBER: _ClassVar[int]
    REUSED_TENSORS_FIELD_NUMBER: _ClassVar[int]
    PATCH_FILE_BYTES_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    fencing_token: int
    lease_expires_at: _timestamp_pb2.Timestamp
    attempt: int
    method_version: str
    patch: _common_pb2.PatchVersion
    source_base: _common_pb2.BaseVersion
    target_base: _common_pb2.BaseVersion
    merged: bool
    reused_tensors: _containers.RepeatedCompositeFieldContainer[ReusedTensor]
    patch_file_bytes: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, job_id: _Optional[str] = ..., fencing_token: _Optional[int] = ..., lease_expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., attempt: _Optional[int] = ..., method_version: _Optional[str] = ..., patch: _Optional[_Union[_common_pb2.PatchVersion, _Mapping]] = ..., source_base: _Optional[_Union[_common_pb2.BaseVersion, _Mapping]] = ..., target_base: _Optional[_Union[_common_pb2.BaseVersion, _Mapping]] = ..., merged: _Optional[bool] = ..., reused_tensors: _Optional[_Iterable[_Union[ReusedTensor, _Mapping]]] = ..., patch_file_bytes: _Optional[_Iterable[bytes]] = ...) -> None: ...

class ReusedTensor(_message.Message):
    __slots__ = ("tensor", "digest", "size", "diagnostics")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    DIAGNOSTICS_FIELD_NUMBER: _ClassVar[int]
    tensor: str
    digest: str
    size: int
    diagnostics: _ports_pb2.ModuleDiagnostics
    def __init__(self, tensor: _Optional[str] = ..., digest: _Optional[str] = ..., size: _Optional[int] = ..., diagnostics: _Optional[_Union[_ports_pb2.ModuleDiagnostics, _Mapping]] = ...) -> None: ...

class LeaseJobResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("job_id", "fencing_token")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    FENCING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    fencing_token: int
    def __init__(self, job_id: _Optional[str] = ..., fencing_token: _Optional[int] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("lease_expires_at", "cancelled")
    LEASE_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    lease_expires_at: _timestamp_pb2.Timestamp
    cancelled: bool
    def __init__(self, lease_expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., cancelled: _Optional[bool] = ...) -> None: ...

class PrepareComposedRequest(_message.Message):
    __slots__ = ("job_id", "fencing_token", "files")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    FENCING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    fencing_token: int
    files: _containers.RepeatedCompositeFieldContainer[ComposedPrefix]
    def __init__(self, job_id: _Optional[str] = ..., fencing_token: _Optional[int] = ..., files: _Optional[_Iterable[_Union[ComposedPrefix, _Mapping]]] = ...) -> None: ...

class ComposedPrefix(_message.Message):
    __slots__ = ("header", "ranges")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    RANGES_FIELD_NUMBER: _ClassVar[int]
    header: bytes
    ranges: _containers.RepeatedCompositeFieldContainer[_common_pb2.BlobRange]
    def __init__(self, header: _Optional[bytes] = ..., ranges: _Optional[_Iterable[_Union[_common_pb2.BlobRange, _Mapping]]] = ...) -> None: ...

class PrepareComposedResponse(_message.Message):
    __slots__ = ("hashing_bytes",)
    HASHING_BYTES_FIELD_NUMBER: _ClassVar[int]
    hashing_bytes: int
    def __init__(self, hashing_bytes: _Optional[int] = ...) -> None: ...

class CompleteJobRequest(_message.Message):
    __slots__ = ("job_id", "fencing_token", "refusals", "diagnostics", "adapter_files", "merged_files", "engine_seconds", "evaluation", "device", "inline_blobs")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    FENCING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    REFUSALS_FIELD_NUMBER: _ClassVar[int]
    DIAGNOSTICS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FILES_FIELD_NUMBER: _ClassVar[int]
    MERGED_FILES_FIELD_NUMBER: _ClassVar[int]
    ENGINE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    INLINE_BLOBS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    fencing_token: int
    refusals: _containers.RepeatedCompositeFieldContainer[_ports_pb2.Refusal]
    diagnostics: _ports_pb2.PortDiagnostics
    adapter_files: _containers.RepeatedCompositeFieldContainer[_common_pb2.FileEntry]
    merged_files: _containers.RepeatedCompositeFieldContainer[_common_pb2.FileEntry]
    engine_seconds: float
    evaluation: _ports_pb2.Evaluation
    device: str
    inline_blobs: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, job_id: _Optional[str] = ..., fencing_token: _Optional[int] = ..., refusals: _Optional[_Iterable[_Union[_ports_pb2.Refusal, _Mapping]]] = ..., diagnostics: _Optional[_Union[_ports_pb2.PortDiagnostics, _Mapping]] = ..., adapter_files: _Optional[_Iterable[_Union[_common_pb2.FileEntry, _Mapping]]] = ..., merged_files: _Optional[_Iterable[_Union[_common_pb2.FileEntry, _Mapping]]] = ..., engine_seconds: _Optional[float] = ..., evaluation: _Optional[_Union[_ports_pb2.Evaluation, _Mapping]] = ..., device: _Optional[str] = ..., inline_blobs: _Optional[_Iterable[bytes]] = ...) -> None: ...

class CompleteJobResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CompleteJobsRequest(_message.Message):
    __slots__ = ("completions",)
    COMPLETIONS_FIELD_NUMBER: _ClassVar[int]
    completions: _containers.RepeatedCompositeFieldContainer[CompleteJobRequest]
    def __init__(self, completions: _Optional[_Iterable[_Union[CompleteJobRequest, _Mapping]]] = ...) -> None: ...

class CompleteJobsResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[CompleteJobResult]
    def __init__(self, results: _Optional[_Iterable[_Union[CompleteJobResult, _Mapping]]] = ...) -> None: ...

class CompleteJobResult(_message.Message):
    __slots__ = ("job_id", "code", "message")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    code: int
    message: str
    def __init__(self, job_id: _Optional[str] = ..., code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class FailJobRequest(_message.Message):
    __slots__ = ("job_id", "fencing_token", "error", "retryable")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    FENCING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RETRYABLE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    fencing_token: int
    error: str
    retryable: bool
    def __init__(self, job_id: _Optional[str] = ..., fencing_token: _Optional[int] = ..., error: _Optional[str] = ..., retryable: _Optional[bool] = ...) -> None: ...

class FailJobResponse(_message.Message):
    __slots__ = ("retry_at",)
    RETRY_AT_FIELD_NUMBER: _ClassVar[int]
    retry_at: _timestamp_pb2.Timestamp
    def __init__(self, retry_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ReleaseJobRequest(_message.Message):
    __slots__ = ("job_id", "fencing_token")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    FENCING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    fencing_token: int
    def __init__(self, job_id: _Optional[str] = ..., fencing_token: _Optional[int] = ...) -> None: ...

class ReleaseJobResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
