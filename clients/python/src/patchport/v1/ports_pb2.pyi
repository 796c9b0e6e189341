import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from patchport.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PortState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PORT_STATE_UNSPECIFIED: _ClassVar[PortState]
    PORT_STATE_QUEUED: _ClassVar[PortState]
    PORT_STATE_RUNNING: _ClassVar[PortState]
    PORT_STATE_SUCCEEDED: _ClassVar[PortState]
    PORT_STATE_INCOMPATIBLE: _ClassVar[PortState]
    PORT_STATE_FAILED: _ClassVar[PortState]
    PORT_STATE_CANCELLED: _ClassVar[PortState]

class CompatKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMPAT_KIND_UNSPECIFIED: _ClassVar[CompatKind]
    COMPAT_KIND_NATIVE: _ClassVar[CompatKind]
    COMPAT_KIND_PORTED: _ClassVar[CompatKind]
    COMPAT_KIND_QUEUED: _ClassVar[CompatKind]
    COMPAT_KIND_RUNNING: _ClassVar[CompatKind]
    COMPAT_KIND_INCOMPATIBLE: _ClassVar[CompatKind]
    COMPAT_KIND_FAILED: _ClassVar[CompatKind]
    COMPAT_KIND_CANCELLED: _ClassVar[CompatKind]
PORT_STATE_UNSPECIFIED: PortState
PORT_STATE_QUEUED: PortState
PORT_STATE_RUNNING: PortState
PORT_STATE_SUCCEEDED: PortState
PORT_STATE_INCOMPATIBLE: PortState
PORT_STATE_FAILED: PortState
PORT_STATE_CANCELLED: PortState
COMPAT_KIND_UNSPECIFIED: CompatKind
COMPAT_KIND_NATIVE: CompatKind
COMPAT_KIND_PORTED: CompatKind
COMPAT_KIND_QUEUED: CompatKind
COMPAT_KIND_RUNNING: CompatKind
COMPAT_KIND_INCOMPATIBLE: CompatKind
COMPAT_KIND_FAILED: CompatKind
COMPAT_KIND_CANCELLED: CompatKind

class Refusal(_message.Message):
    __slots__ = ("kind", "message", "subject")
    KIND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    kind: str
    message: str
    subject: str
    def __init__(self, kind: _Optional[str] = ..., message: _Optional[str] = ..., subject: _Optional[str] = ...) -> None: ...

class ModuleDiagnostics(_message.Message):
    __slots__ = ("module", "base_drift", "patch_size", "drift_to_patch", "cosine", "unchanged", "sums")
    MODULE_FIELD_NUMBER: _ClassVar[int]
    BASE_DRIFT_FIELD_NUMBER: _ClassVar[int]
    PATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    DRIFT_TO_PATCH_FIELD_NUMBER: _ClassVar[int]
    COSINE_FIELD_NUMBER: _ClassVar[int]
    UNCHANGED_FIELD_NUMBER: _ClassVar[int]
    SUMS_FIELD_NUMBER: _ClassVar[int]
    module: str
    base_drift: float
    patch_size: float
    drift_to_patch: float
    cosine: float
    unchanged: bool
    sums: DeltaStats
    def __init__(self, module: _Optional[str] = ..., base_drift: _Optional[float] = ..., patch_size: _Optional[float] = ..., drift_to_patch: _Optional[float] = ..., cosine: _Optional[float] = ..., unchanged: _Optional[bool] = ..., sums: _Optional[_Union[DeltaStats, _Mapping]] = ...) -> None: ...

class DeltaStats(_message.Message):
    __slots__ = ("delta_sq", "drift_sq", "old_sq", "dot")
    DELTA_SQ_FIELD_NUMBER: _ClassVar[int]
    DRIFT_SQ_FIELD_NUMBER: _ClassVar[int]
    OLD_SQ_FIELD_NUMBER: _ClassVar[int]
    DOT_FIELD_NUMBER: _ClassVar[int]
    delta_sq: float
    drift_sq: float
    old_sq: float
    dot: float
    def __init__(self, delta_sq: _Optional[float] = ..., drift_sq: _Optional[float] = ..., old_sq: _Optional[float] = ..., dot: _Optional[float] = ...) -> None: ...

class PortDiagnostics(_message.Message):
    __slots__ = ("modules", "total", "risk", "high_risk")
    MODULES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    RISK_FIELD_NUMBER: _ClassVar[int]
    HIGH_RISK_FIELD_NUMBER: _ClassVar[int]
    modules: _containers.RepeatedCompositeFieldContainer[ModuleDiagnostics]
    total: ModuleDiagnostics
    risk: float
    high_risk: bool
    def __init__(self, modules: _Optional[_Iterable[_Union[ModuleDiagnostics, _Mapping]]] = ..., total: _Optional[_Union[ModuleDiagnostics, _Mapping]] = ..., risk: _Optional[float] = ..., high_risk: _Optional[bool] = ...) -> None: ...

class Port(_message.Message):
    __slots__ = ("patch", "patch_digest", "base", "base_digest", "source_base_digest", "state", "refusals", "diagnostics", "adapter_files", "merged_files", "attempts", "error", "method_version", "queued_at", "started_at", "finished_at", "job_id", "evaluation", "queue_position")
    PATCH_FIELD_NUMBER: _ClassVar[int]
    PATCH_DIGEST_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    BASE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    SOURCE_BASE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REFUSALS_FIELD_NUMBER: _ClassVar[int]
    DIAGNOSTICS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FILES_FIELD_NUMBER: _ClassVar[int]
    MERGED_FILES_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    METHOD_VERSION_FIELD_NUMBER: _ClassVar[int]
    QUEUED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    patch: str
    patch_digest: str
    base: str
    base_digest: str
    source_base_digest: str
    state: PortState
    refusals: _containers.RepeatedCompositeFieldContainer[Refusal]
    diagnostics: PortDiagnostics
    adapter_files: _containers.RepeatedCompositeFieldContainer[_common_pb2.FileEntry]
    merged_files: _containers.RepeatedCompositeFieldContainer[_common_pb2.FileEntry]
    attempts: int
    error: str
    method_version: str
    queued_at: _timestamp_pb2.Timestamp
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    job_id: str
    evaluation: Evaluation
    queue_position: int
    def __init__(self, patch: _Optional[str] = ..., patch_digest: _Optional[str] = ..., base: _Optional[str] = ..., base_digest: _Optional[str] = ..., source_base_digest: _Optional[str] = ..., state: _Optional[_Union[PortState, str]] = ..., refusals: _Optional[_Iterable[_Union[Refusal, _Mapping]]] = ..., diagnostics: _Optional[_Union[PortDiagnostics, _Mapping]] = ..., adapter_files: _Optional[_Iterable[_Union[_common_pb2.FileEntry, _Mapping]]] = ..., merged_files: _Optional[_Iterable[_Union[_common_pb2.FileEntry, _Mapping]]] = ..., attempts: _Optional[int] = ..., error: _Optional[str] = ..., method_version: _Optional[str] = ..., queued_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., job_id: _Optional[str] = ..., evaluation: _Optional[_Union[Evaluation, _Mapping]] = ..., queue_position: _Optional[int] = ...) -> None: ...

class ArmResult(_message.Message):
    __slots__ = ("metric", "value", "items")
    METRIC_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    metric: str
    value: float
    items: int
    def __init__(self, metric: _Optional[str] = ..., value: _Optional[float] = ..., items: _Optional[int] = ...) -> None: ...

class Evaluation(_message.Message):
    __slots__ = ("status", "reason", "verdict", "reference", "base_alone", "ported", "delta", "standard_error", "threshold", "gain_over_base", "eval_digest", "seconds", "report_json")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    BASE_ALONE_FIELD_NUMBER: _ClassVar[int]
    PORTED_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    STANDARD_ERROR_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    GAIN_OVER_BASE_FIELD_NUMBER: _ClassVar[int]
    EVAL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    REPORT_JSON_FIELD_NUMBER: _ClassVar[int]
    status: str
    reason: str
    verdict: str
    reference: ArmResult
    base_alone: ArmResult
    ported: ArmResult
    delta: float
    standard_error: float
    threshold: float
    gain_over_base: float
    eval_digest: str
    seconds: float
    report_json: str
    def __init__(self, status: _Optional[str] = ..., reason: _Optional[str] = ..., verdict: _Optional[str] = ..., reference: _Optional[_Union[ArmResult, _Mapping]] = ..., base_alone: _Optional[_Union[ArmResult, _Mapping]] = ..., ported: _Optional[_Union[ArmResult, _Mapping]] = ..., delta: _Optional[float] = ..., standard_error: _Optional[float] = ..., threshold: _Optional[float] = ..., gain_over_base: _Optional[float] = ..., eval_digest: _Optional[str] = ..., seconds: _Optional[float] = ..., report_json: _Optional[str] = ...) -> None: ...

class Refusals(_message.Message):
    __slots__ = ("refusals",)
    REFUSALS_FIELD_NUMBER: _ClassVar[int]
    refusals: _containers.RepeatedCompositeFieldContainer[Refusal]
    def __init__(self, refusals: _Optional[_Iterable[_Union[Refusal, _Mapping]]] = ...) -> None: ...

class GetPortRequest(_message.Message):
    __slots__ = ("reference",)
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    reference: str
    def __init__(self, reference: _Optional[str] = ...) -> None: ...

class QueryCompatRequest(_message.Message):
    __slots__ = ("patch", "base", "page_size", "page_token")
    PATCH_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    patch: str
    base: str
    page_size: int
    page_token: str
    def __init__(self, patch: _Optional[str] = ..., base: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class CompatEntry(_message.Message):
    __slots__ = ("patch", "patch_digest", "base", "base_digest", "kind", "port")
    PATCH_FIELD_NUMBER: _ClassVar[int]
    PATCH_DIGEST_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    BASE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    patch: str
    patch_digest: str
    base: str
    base_digest: str
    kind: CompatKind
    port: Port
    def __init__(self, patch: _Optional[str] = ..., patch_digest: _Optional[str] = ..., base: _Optional[str] = ..., base_digest: _Optional[str] = ..., kind: _Optional[_Union[CompatKind, str]] = ..., port: _Optional[_Union[Port, _Mapping]] = ...) -> None: ...

class QueryCompatResponse(_message.Message):
    __slots__ = ("entries", "next_page_token")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[CompatEntry]
    next_page_token: str
    def __init__(self, entries: _Optional[_Iterable[_Union[CompatEntry, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ResolveRequest(_message.Message):
    __slots__ = ("patch", "base_digest", "require_pass", "require_signed")
    PATCH_FIELD_NUMBER: _ClassVar[int]
    BASE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    REQUIRE_PASS_FIELD_NUMBER: _ClassVar[int]
    REQUIRE_SIGNED_FIELD_NUMBER: _ClassVar[int]
    patch: str
    base_digest: str
    require_pass: bool
    require_signed: bool
    def __init__(self, patch: _Optional[str] = ..., base_digest: _Optional[str] = ..., require_pass: _Optional[bool] = ..., require_signed: _Optional[bool] = ...) -> None: ...

class ResolveResponse(_message.Message):
    __slots__ = ("kind", "patch", "base", "adapter_files")
    KIND_FIELD_NUMBER: _ClassVar[int]
    PATCH_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FILES_FIELD_NUMBER: _ClassVar[int]
    kind: CompatKind
    patch: str
    base: str
    adapter_files: _containers.RepeatedCompositeFieldContainer[_common_pb2.FileEntry]
    def __init__(self, kind: _Optional[_Union[CompatKind, str]] = ..., patch: _Optional[str] = ..., base: _Optional[str] = ..., adapter_files: _Optional[_Iterable[_Union[_common_pb2.FileEntry, _Mapping]]] = ...) -> None: ...

class RequestPortRequest(_message.Message):
    __slots__ = ("patch", "base", "priority")
    PATCH_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    patch: str
    base: str
    priority: int
    def __init__(self, patch: _Optional[str] = ..., base: _Optional[str] = ..., priority: _Optional[int] = ...) -> None: ...
