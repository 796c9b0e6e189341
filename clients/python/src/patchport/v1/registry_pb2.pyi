from patchport.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PushBaseVersionRequest(_message.Message):
    __slots__ = ("name", "version", "parent", "files", "validate_only")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    VALIDATE_ONLY_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    parent: str
    files: _containers.RepeatedCompositeFieldContainer[_common_pb2.FileEntry]
    validate_only: bool
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., parent: _Optional[str] = ..., files: _Optional[_Iterable[_Union[_common_pb2.FileEntry, _Mapping]]] = ..., validate_only: _Optional[bool] = ...) -> None: ...

class PushBaseVersionResponse(_message.Message):
    __slots__ = ("version", "created")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    version: _common_pb2.BaseVersion
    created: bool
    def __init__(self, version: _Optional[_Union[_common_pb2.BaseVersion, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class PushPatchVersionRequest(_message.Message):
    __slots__ = ("name", "version", "base", "files", "eval_digest", "validate_only", "allow_architecture_mismatch")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    EVAL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    VALIDATE_ONLY_FIELD_NUMBER: _ClassVar[int]
    ALLOW_ARCHITECTURE_MISMATCH_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    base: str
    files: _containers.RepeatedCompositeFieldContainer[_common_pb2.FileEntry]
    eval_digest: str
    validate_only: bool
    allow_architecture_mismatch: bool
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., base: _Optional[str] = ..., files: _Optional[_Iterable[_Union[_common_pb2.FileEntry, _Mapping]]] = ..., eval_digest: _Optional[str] = ..., validate_only: _Optional[bool] = ..., allow_architecture_mismatch: _Optional[bool] = ...) -> None: ...

class PushPatchVersionResponse(_message.Message):
    __slots__ = ("version", "created")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    version: _common_pb2.PatchVersion
    created: bool
    def __init__(self, version: _Optional[_Union[_common_pb2.PatchVersion, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class GetVersionRequest(_message.Message):
    __slots__ = ("reference",)
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    reference: str
    def __init__(self, reference: _Optional[str] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ("filter", "include_yanked", "page_size", "page_token")
    FILTER_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_YANKED_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    filter: str
    include_yanked: bool
    page_size: int
    page_token: str
    def __init__(self, filter: _Optional[str] = ..., include_yanked: _Optional[bool] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListBaseVersionsResponse(_message.Message):
    __slots__ = ("versions", "next_page_token")
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[_common_pb2.BaseVersion]
    next_page_token: str
    def __init__(self, versions: _Optional[_Iterable[_Union[_common_pb2.BaseVersion, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ListPatchVersionsResponse(_message.Message):
    __slots__ = ("versions", "next_page_token")
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[_common_pb2.PatchVersion]
    next_page_token: str
    def __init__(self, versions: _Optional[_Iterable[_Union[_common_pb2.PatchVersion, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class YankRequest(_message.Message):
    __slots__ = ("reference", "reason")
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    reference: str
    reason: str
    def __init__(self, reference: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class TensorIndex(_message.Message):
    __slots__ = ("reference", "digest", "tensors")
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    reference: str
    digest: str
    tensors: _containers.RepeatedCompositeFieldContainer[_common_pb2.TensorEntry]
    def __init__(self, reference: _Optional[str] = ..., digest: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[_common_pb2.TensorEntry, _Mapping]]] = ...) -> None: ...
