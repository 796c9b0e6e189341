import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class VersionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VERSION_STATE_UNSPECIFIED: _ClassVar[VersionState]
    VERSION_STATE_PUBLISHED: _ClassVar[VersionState]
    VERSION_STATE_YANKED: _ClassVar[VersionState]
VERSION_STATE_UNSPECIFIED: VersionState
VERSION_STATE_PUBLISHED: VersionState
VERSION_STATE_YANKED: VersionState

class FileEntry(_message.Message):
    __slots__ = ("path", "digest", "size", "segments")
    PATH_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    path: str
    digest: str
    size: int
    segments: _containers.RepeatedCompositeFieldContainer[Segment]
    def __init__(self, path: _Optional[str] = ..., digest: _Optional[str] = ..., size: _Optional[int] = ..., segments: _Optional[_Iterable[_Union[Segment, _Mapping]]] = ...) -> None: ...

class Segment(_message.Message):
    __slots__ = ("inline", "blob")
    INLINE_FIELD_NUMBER: _ClassVar[int]
    BLOB_FIELD_NUMBER: _ClassVar[int]
    inline: bytes
    blob: BlobRange
    def __init__(self, inline: _Optional[bytes] = ..., blob: _Optional[_Union[BlobRange, _Mapping]] = ...) -> None: ...

class BlobRange(_message.Message):
    __slots__ = ("digest", "offset", "length")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    digest: str
    offset: int
    length: int
    def __init__(self, digest: _Optional[str] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class TensorEntry(_message.Message):
    __slots__ = ("name", "dtype", "shape", "file", "begin", "end", "digest")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    BEGIN_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    file: str
    begin: int
    end: int
    digest: str
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., file: _Optional[str] = ..., begin: _Optional[int] = ..., end: _Optional[int] = ..., digest: _Optional[str] = ...) -> None: ...

class BaseVersion(_message.Message):
    __slots__ = ("name", "version", "digest", "parent", "parent_digest", "state", "files", "config", "tensor_count", "total_size", "created_at", "yank_reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    PARENT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    TENSOR_COUNT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    YANK_REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    digest: str
    parent: str
    parent_digest: str
    state: VersionState
    files: _containers.RepeatedCompositeFieldContainer[FileEntry]
    config: ModelConfig
    tensor_count: int
    total_size: int
    created_at: _timestamp_pb2.Timestamp
    yank_reason: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., digest: _Optional[str] = ..., parent: _Optional[str] = ..., parent_digest: _Optional[str] = ..., state: _Optional[_Union[VersionState, str]] = ..., files: _Optional[_Iterable[_Union[FileEntry, _Mapping]]] = ..., config: _Optional[_Union[ModelConfig, _Mapping]] = ..., tensor_count: _Optional[int] = ..., total_size: _Optional[int] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., yank_reason: _Optional[str] = ...) -> None: ...

class ModelConfig(_message.Message):
    __slots__ = ("model_type", "architectures", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size", "torch_dtype", "raw_json")
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURES_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_HIDDEN_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_ATTENTION_HEADS_FIELD_NUMBER: _ClassVar[int]
    NUM_KEY_VALUE_HEADS_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    TORCH_DTYPE_FIELD_NUMBER: _ClassVar[int]
    RAW_JSON_FIELD_NUMBER: _ClassVar[int]
    model_type: str
    architectures: _containers.RepeatedScalarFieldContainer[str]
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    torch_dtype: str
    raw_json: str
    def __init__(self, model_type: _Optional[str] = ..., architectures: _Optional[_Iterable[str]] = ..., hidden_size: _Optional[int] = ..., num_hidden_layers: _Optional[int] = ..., num_attention_heads: _Optional[int] = ..., num_key_value_heads: _Optional[int] = ..., vocab_size: _Optional[int] = ..., torch_dtype: _Optional[str] = ..., raw_json: _Optional[str] = ...) -> None: ...

class AdapterConfig(_message.Message):
    __slots__ = ("peft_type", "r", "lora_alpha", "use_rslora", "use_dora", "fan_in_fan_out", "target_modules", "target_modules_regex", "rank_pattern", "alpha_pattern", "modules_to_save", "base_model_name_or_path", "revision", "lora_bias", "init_lora_weights", "trainable_token_indices", "raw_json")
    class RankPatternEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class AlphaPatternEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    PEFT_TYPE_FIELD_NUMBER: _ClassVar[int]
    R_FIELD_NUMBER: _ClassVar[int]
    LORA_ALPHA_FIELD_NUMBER: _ClassVar[int]
    USE_RSLORA_FIELD_NUMBER: _ClassVar[int]
    USE_DORA_FIELD_NUMBER: _ClassVar[int]
    FAN_IN_FAN_OUT_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_REGEX_FIELD_NUMBER: _ClassVar[int]
    RANK_PATTERN_FIELD_NUMBER: _ClassVar[int]
    ALPHA_PATTERN_FIELD_NUMBER: _ClassVar[int]
    MODULES_TO_SAVE_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_NAME_OR_PATH_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    LORA_BIAS_FIELD_NUMBER: _ClassVar[int]
    INIT_LORA_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    TRAINABLE_TOKEN_INDICES_FIELD_NUMBER: _ClassVar[int]
    RAW_JSON_FIELD_NUMBER: _ClassVar[int]
    peft_type: str
    r: int
    lora_alpha: float
    use_rslora: bool
    use_dora: bool
    fan_in_fan_out: bool
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    target_modules_regex: str
    rank_pattern: _containers.ScalarMap[str, int]
    alpha_pattern: _containers.ScalarMap[str, float]
    modules_to_save: _containers.RepeatedScalarFieldContainer[str]
    base_model_name_or_path: str
    revision: str
    lora_bias: bool
    init_lora_weights: str
    trainable_token_indices: _containers.RepeatedScalarFieldContainer[int]
    raw_json: str
    def __init__(self, peft_type: _Optional[str] = ..., r: _Optional[int] = ..., lora_alpha: _Optional[float] = ..., use_rslora: _Optional[bool] = ..., use_dora: _Optional[bool] = ..., fan_in_fan_out: _Optional[bool] = ..., target_modules: _Optional[_Iterable[str]] = ..., target_modules_regex: _Optional[str] = ..., rank_pattern: _Optional[_Mapping[str, int]] = ..., alpha_pattern: _Optional[_Mapping[str, float]] = ..., modules_to_save: _Optional[_Iterable[str]] = ..., base_model_name_or_path: _Optional[str] = ..., revision: _Optional[str] = ..., lora_bias: _Optional[bool] = ..., init_lora_weights: _Optional[str] = ..., trainable_token_indices: _Optional[_Iterable[int]] = ..., raw_json: _Optional[str] = ...) -> None: ...

class BaseRef(_message.Message):
    __slots__ = ("name", "version", "digest")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    digest: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., digest: _Optional[str] = ...) -> None: ...

class PatchVersion(_message.Message):
    __slots__ = ("name", "version", "digest", "base", "state", "files", "adapter", "tensor_count", "total_size", "created_at", "eval_digest")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    TENSOR_COUNT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    EVAL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    digest: str
    base: BaseRef
    state: VersionState
    files: _containers.RepeatedCompositeFieldContainer[FileEntry]
    adapter: AdapterConfig
    tensor_count: int
    total_size: int
    created_at: _timestamp_pb2.Timestamp
    eval_digest: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., digest: _Optional[str] = ..., base: _Optional[_Union[BaseRef, _Mapping]] = ..., state: _Optional[_Union[VersionState, str]] = ..., files: _Optional[_Iterable[_Union[FileEntry, _Mapping]]] = ..., adapter: _Optional[_Union[AdapterConfig, _Mapping]] = ..., tensor_count: _Optional[int] = ..., total_size: _Optional[int] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., eval_digest: _Optional[str] = ...) -> None: ...
