from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class GetSignatureRequest(_message.Message):
    __slots__ = ("reference", "merged")
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    MERGED_FIELD_NUMBER: _ClassVar[int]
    reference: str
    merged: bool
    def __init__(self, reference: _Optional[str] = ..., merged: _Optional[bool] = ...) -> None: ...

class Signature(_message.Message):
    __slots__ = ("model_signature", "provenance", "key_hint")
    MODEL_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_FIELD_NUMBER: _ClassVar[int]
    KEY_HINT_FIELD_NUMBER: _ClassVar[int]
    model_signature: str
    provenance: str
    key_hint: str
    def __init__(self, model_signature: _Optional[str] = ..., provenance: _Optional[str] = ..., key_hint: _Optional[str] = ...) -> None: ...

class GetSigningKeysRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SigningKeys(_message.Message):
    __slots__ = ("public_keys_pem",)
    PUBLIC_KEYS_PEM_FIELD_NUMBER: _ClassVar[int]
    public_keys_pem: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, public_keys_pem: _Optional[_Iterable[str]] = ...) -> None: ...
