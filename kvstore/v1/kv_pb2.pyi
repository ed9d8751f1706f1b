from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ErrorCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OK: _ClassVar[ErrorCode]
    NOT_LEADER: _ClassVar[ErrorCode]
    NO_LEADER: _ClassVar[ErrorCode]
    KEY_TOO_LARGE: _ClassVar[ErrorCode]
    VALUE_TOO_LARGE: _ClassVar[ErrorCode]
    REQUEST_TOO_LARGE: _ClassVar[ErrorCode]
    INVALID_ARGUMENT: _ClassVar[ErrorCode]
    TIMEOUT: _ClassVar[ErrorCode]
    LEADERSHIP_LOST: _ClassVar[ErrorCode]
    PROPOSAL_DROPPED: _ClassVar[ErrorCode]
    STORAGE_FULL: _ClassVar[ErrorCode]
    WRONG_SHARD: _ClassVar[ErrorCode]
    SHUTTING_DOWN: _ClassVar[ErrorCode]
    INTERNAL: _ClassVar[ErrorCode]
    STALE_REPLICA: _ClassVar[ErrorCode]
    SESSION_EXPIRED: _ClassVar[ErrorCode]
    RESOURCE_EXHAUSTED: _ClassVar[ErrorCode]
    NOSPACE: _ClassVar[ErrorCode]
    COMPACTED: _ClassVar[ErrorCode]
    UNAUTHENTICATED: _ClassVar[ErrorCode]
    PERMISSION_DENIED: _ClassVar[ErrorCode]

class Refusal(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REFUSAL_NONE: _ClassVar[Refusal]
    REFUSAL_LEASE_NOT_FOUND: _ClassVar[Refusal]
    REFUSAL_LEASE_EXISTS: _ClassVar[Refusal]
    REFUSAL_USER_EXISTS: _ClassVar[Refusal]
    REFUSAL_USER_NOT_FOUND: _ClassVar[Refusal]
    REFUSAL_ROLE_EXISTS: _ClassVar[Refusal]
    REFUSAL_ROLE_NOT_FOUND: _ClassVar[Refusal]
    REFUSAL_ROLE_NOT_GRANTED: _ClassVar[Refusal]
    REFUSAL_PERMISSION_NOT_GRANTED: _ClassVar[Refusal]
    REFUSAL_ROOT_USER_MISSING: _ClassVar[Refusal]
    REFUSAL_AUTH_NOT_ENABLED: _ClassVar[Refusal]

class Consistency(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LINEARIZABLE: _ClassVar[Consistency]
    SERIALIZABLE: _ClassVar[Consistency]
    STALE: _ClassVar[Consistency]
    BOUNDED: _ClassVar[Consistency]

class CompareTarget(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMPARE_TARGET_UNSPECIFIED: _ClassVar[CompareTarget]
    COMPARE_VALUE: _ClassVar[CompareTarget]
    COMPARE_VERSION: _ClassVar[CompareTarget]
    COMPARE_CREATE: _ClassVar[CompareTarget]
    COMPARE_MOD: _ClassVar[CompareTarget]
    COMPARE_LEASE: _ClassVar[CompareTarget]

class CompareResult(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMPARE_RESULT_UNSPECIFIED: _ClassVar[CompareResult]
    EQUAL: _ClassVar[CompareResult]
    NOT_EQUAL: _ClassVar[CompareResult]
    GREATER: _ClassVar[CompareResult]
    LESS: _ClassVar[CompareResult]
OK: ErrorCode
NOT_LEADER: ErrorCode
NO_LEADER: ErrorCode
KEY_TOO_LARGE: ErrorCode
VALUE_TOO_LARGE: ErrorCode
REQUEST_TOO_LARGE: ErrorCode
INVALID_ARGUMENT: ErrorCode
TIMEOUT: ErrorCode
LEADERSHIP_LOST: ErrorCode
PROPOSAL_DROPPED: ErrorCode
STORAGE_FULL: ErrorCode
WRONG_SHARD: ErrorCode
SHUTTING_DOWN: ErrorCode
INTERNAL: ErrorCode
STALE_REPLICA: ErrorCode
SESSION_EXPIRED: ErrorCode
RESOURCE_EXHAUSTED: ErrorCode
NOSPACE: ErrorCode
COMPACTED: ErrorCode
UNAUTHENTICATED: ErrorCode
PERMISSION_DENIED: ErrorCode
REFUSAL_NONE: Refusal
REFUSAL_LEASE_NOT_FOUND: Refusal
REFUSAL_LEASE_EXISTS: Refusal
REFUSAL_USER_EXISTS: Refusal
REFUSAL_USER_NOT_FOUND: Refusal
REFUSAL_ROLE_EXISTS: Refusal
REFUSAL_ROLE_NOT_FOUND: Refusal
REFUSAL_ROLE_NOT_GRANTED: Refusal
REFUSAL_PERMISSION_NOT_GRANTED: Refusal
REFUSAL_ROOT_USER_MISSING: Refusal
REFUSAL_AUTH_NOT_ENABLED: Refusal
LINEARIZABLE: Consistency
SERIALIZABLE: Consistency
STALE: Consistency
BOUNDED: Consistency
COMPARE_TARGET_UNSPECIFIED: CompareTarget
COMPARE_VALUE: CompareTarget
COMPARE_VERSION: CompareTarget
COMPARE_CREATE: CompareTarget
COMPARE_MOD: CompareTarget
COMPARE_LEASE: CompareTarget
COMPARE_RESULT_UNSPECIFIED: CompareResult
EQUAL: CompareResult
NOT_EQUAL: CompareResult
GREATER: CompareResult
LESS: CompareResult

class Error(_message.Message):
    __slots__ = ("code", "message", "leader_id", "leader_hint", "indeterminate", "shard_version", "retry_after_ms", "leader_client_hint", "compact_revision", "future_revision", "refusal")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    LEADER_ID_FIELD_NUMBER: _ClassVar[int]
    LEADER_HINT_FIELD_NUMBER: _ClassVar[int]
    INDETERMINATE_FIELD_NUMBER: _ClassVar[int]
    SHARD_VERSION_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    LEADER_CLIENT_HINT_FIELD_NUMBER: _ClassVar[int]
    COMPACT_REVISION_FIELD_NUMBER: _ClassVar[int]
    FUTURE_REVISION_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_FIELD_NUMBER: _ClassVar[int]
    code: ErrorCode
    message: str
    leader_id: int
    leader_hint: str
    indeterminate: bool
    shard_version: int
    retry_after_ms: int
    leader_client_hint: str
    compact_revision: int
    future_revision: bool
    refusal: Refusal
    def __init__(self, code: _Optional[_Union[ErrorCode, str]] = ..., message: _Optional[str] = ..., leader_id: _Optional[int] = ..., leader_hint: _Optional[str] = ..., indeterminate: _Optional[bool] = ..., shard_version: _Optional[int] = ..., retry_after_ms: _Optional[int] = ..., leader_client_hint: _Optional[str] = ..., compact_revision: _Optional[int] = ..., future_revision: _Optional[bool] = ..., refusal: _Optional[_Union[Refusal, str]] = ...) -> None: ...

class Session(_message.Message):
    __slots__ = ("client_id", "seq", "ack", "retry", "horizon", "revision")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    RETRY_FIELD_NUMBER: _ClassVar[int]
    HORIZON_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    seq: int
    ack: int
    retry: bool
    horizon: int
    revision: int
    def __init__(self, client_id: _Optional[int] = ..., seq: _Optional[int] = ..., ack: _Optional[int] = ..., retry: _Optional[bool] = ..., horizon: _Optional[int] = ..., revision: _Optional[int] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("key", "consistency", "max_staleness_ms", "revision", "with_lease")
    KEY_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_FIELD_NUMBER: _ClassVar[int]
    MAX_STALENESS_MS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    WITH_LEASE_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    consistency: Consistency
    max_staleness_ms: int
    revision: int
    with_lease: bool
    def __init__(self, key: _Optional[bytes] = ..., consistency: _Optional[_Union[Consistency, str]] = ..., max_staleness_ms: _Optional[int] = ..., revision: _Optional[int] = ..., with_lease: _Optional[bool] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("error", "found", "value", "index", "staleness_ms", "node_id", "revision", "create_revision", "mod_revision", "version", "lease", "lease_read")
    ERROR_FIELD_NUMBER: _ClassVar[int]
    FOUND_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    STALENESS_MS_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    CREATE_REVISION_FIELD_NUMBER: _ClassVar[int]
    MOD_REVISION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    LEASE_READ_FIELD_NUMBER: _ClassVar[int]
    error: Error
    found: bool
    value: bytes
    index: int
    staleness_ms: int
    node_id: int
    revision: int
    create_revision: int
    mod_revision: int
    version: int
    lease: int
    lease_read: bool
    def __init__(self, error: _Optional[_Union[Error, _Mapping]] = ..., found: _Optional[bool] = ..., value: _Optional[bytes] = ..., index: _Optional[int] = ..., staleness_ms: _Optional[int] = ..., node_id: _Optional[int] = ..., revision: _Optional[int] = ..., create_revision: _Optional[int] = ..., mod_revision: _Optional[int] = ..., version: _Optional[int] = ..., lease: _Optional[int] = ..., lease_read: _Optional[bool] = ...) -> None: ...

class PutRequest(_message.Message):
    __slots__ = ("key", "value", "session")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    value: bytes
    session: Session
    def __init__(self, key: _Optional[bytes] = ..., value: _Optional[bytes] = ..., session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class PutResponse(_message.Message):
    __slots__ = ("error", "index", "revision")
    ERROR_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    error: Error
    index: int
    revision: int
    def __init__(self, error: _Optional[_Union[Error, _Mapping]] = ..., index: _Optional[int] = ..., revision: _Optional[int] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("key", "session", "range_end", "prefix")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    RANGE_END_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    session: Session
    range_end: bytes
    prefix: bytes
    def __init__(self, key: _Optional[bytes] = ..., session: _Optional[_Union[Session, _Mapping]] = ..., range_end: _Optional[bytes] = ..., prefix: _Optional[bytes] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("error", "existed", "index", "revision", "deleted")
    ERROR_FIELD_NUMBER: _ClassVar[int]
    EXISTED_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    error: Error
    existed: bool
    index: int
    revision: int
    deleted: int
    def __init__(self, error: _Optional[_Union[Error, _Mapping]] = ..., existed: _Optional[bool] = ..., index: _Optional[int] = ..., revision: _Optional[int] = ..., deleted: _Optional[int] = ...) -> None: ...

class CasRequest(_message.Message):
    __slots__ = ("key", "expect_absent", "expected", "value", "session")
    KEY_FIELD_NUMBER: _ClassVar[int]
    EXPECT_ABSENT_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    expect_absent: bool
    expected: bytes
    value: bytes
    session: Session
    def __init__(self, key: _Optional[bytes] = ..., expect_absent: _Optional[bool] = ..., expected: _Optional[bytes] = ..., value: _Optional[bytes] = ..., session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class CasResponse(_message.Message):
    __slots__ = ("error", "swapped", "found", "current", "index", "revision")
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SWAPPED_FIELD_NUMBER: _ClassVar[int]
    FOUND_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    error: Error
    swapped: bool
    found: bool
    current: bytes
    index: int
    revision: int
    def __init__(self, error: _Optional[_Union[Error, _Mapping]] = ..., swapped: _Optional[bool] = ..., found: _Optional[bool] = ..., current: _Optional[bytes] = ..., index: _Optional[int] = ..., revision: _Optional[int] = ...) -> None: ...

class Compare(_message.Message):
    __slots__ = ("key", "target", "result", "value", "number")
    KEY_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    target: CompareTarget
    result: CompareResult
    value: bytes
    number: int
    def __init__(self, key: _Optional[bytes] = ..., target: _Optional[_Union[CompareTarget, str]] = ..., result: _Optional[_Union[CompareResult, str]] = ..., value: _Optional[bytes] = ..., number: _Optional[int] = ...) -> None: ...

class TxnPut(_message.Message):
    __slots__ = ("key", "value", "lease", "checked")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    CHECKED_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    value: bytes
    lease: int
    checked: int
    def __init__(self, key: _Optional[bytes] = ..., value: _Optional[bytes] = ..., lease: _Optional[int] = ..., checked: _Optional[int] = ...) -> None: ...

class TxnRange(_message.Message):
    __slots__ = ("start", "end", "prefix")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    start: bytes
    end: bytes
    prefix: bytes
    def __init__(self, start: _Optional[bytes] = ..., end: _Optional[bytes] = ..., prefix: _Optional[bytes] = ...) -> None: ...

class TxnOp(_message.Message):
    __slots__ = ("put", "delete", "get", "txn", "scan", "delete_range")
    PUT_FIELD_NUMBER: _ClassVar[int]
    DELETE_FIELD_NUMBER: _ClassVar[int]
    GET_FIELD_NUMBER: _ClassVar[int]
    TXN_FIELD_NUMBER: _ClassVar[int]
    SCAN_FIELD_NUMBER: _ClassVar[int]
    DELETE_RANGE_FIELD_NUMBER: _ClassVar[int]
    put: TxnPut
    delete: bytes
    get: bytes
    txn: TxnBody
    scan: TxnScan
    delete_range: TxnRange
    def __init__(self, put: _Optional[_Union[TxnPut, _Mapping]] = ..., delete: _Optional[bytes] = ..., get: _Optional[bytes] = ..., txn: _Optional[_Union[TxnBody, _Mapping]] = ..., scan: _Optional[_Union[TxnScan, _Mapping]] = ..., delete_range: _Optional[_Union[TxnRange, _Mapping]] = ...) -> None: ...

class TxnScan(_message.Message):
    __slots__ = ("start", "end", "prefix", "limit")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    start: bytes
    end: bytes
    prefix: bytes
    limit: int
    def __init__(self, start: _Optional[bytes] = ..., end: _Optional[bytes] = ..., prefix: _Optional[bytes] = ..., limit: _Optional[int] = ...) -> None: ...

class TxnBody(_message.Message):
    __slots__ = ("compares", "success", "failure")
    COMPARES_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    compares: _containers.RepeatedCompositeFieldContainer[Compare]
    success: _containers.RepeatedCompositeFieldContainer[TxnOp]
    failure: _containers.RepeatedCompositeFieldContainer[TxnOp]
    def __init__(self, compares: _Optional[_Iterable[_Union[Compare, _Mapping]]] = ..., success: _Optional[_Iterable[_Union[TxnOp, _Mapping]]] = ..., failure: _Optional[_Iterable[_Union[TxnOp, _Mapping]]] = ...) -> None: ...

class TxnRequest(_message.Message):
    __slots__ = ("txn", "session")
    TXN_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    txn: TxnBody
    session: Session
    def __init__(self, txn: _Optional[_Union[TxnBody, _Mapping]] = ..., session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class TxnOpResponse(_message.Message):
    __slots__ = ("put", "delete", "get", "txn", "scan", "delete_range")
    PUT_FIELD_NUMBER: _ClassVar[int]
    DELETE_FIELD_NUMBER: _ClassVar[int]
    GET_FIELD_NUMBER: _ClassVar[int]
    TXN_FIELD_NUMBER: _ClassVar[int]
    SCAN_FIELD_NUMBER: _ClassVar[int]
    DELETE_RANGE_FIELD_NUMBER: _ClassVar[int]
    put: int
    delete: bool
    get: KeyValue
    txn: TxnResult
    scan: TxnScanResult
    delete_range: int
    def __init__(self, put: _Optional[int] = ..., delete: _Optional[bool] = ..., get: _Optional[_Union[KeyValue, _Mapping]] = ..., txn: _Optional[_Union[TxnResult, _Mapping]] = ..., scan: _Optional[_Union[TxnScanResult, _Mapping]] = ..., delete_range: _Optional[int] = ...) -> None: ...

class TxnScanResult(_message.Message):
    __slots__ = ("items", "more", "revision")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[KeyValue]
    more: bool
    revision: int
    def __init__(self, items: _Optional[_Iterable[_Union[KeyValue, _Mapping]]] = ..., more: _Optional[bool] = ..., revision: _Optional[int] = ...) -> None: ...

class TxnResult(_message.Message):
    __slots__ = ("succeeded", "responses")
    SUCCEEDED_FIELD_NUMBER: _ClassVar[int]
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    succeeded: bool
    responses: _containers.RepeatedCompositeFieldContainer[TxnOpResponse]
    def __init__(self, succeeded: _Optional[bool] = ..., responses: _Optional[_Iterable[_Union[TxnOpResponse, _Mapping]]] = ...) -> None: ...

class TxnResponse(_message.Message):
    __slots__ = ("error", "result", "index", "revision", "read_revision")
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    READ_REVISION_FIELD_NUMBER: _ClassVar[int]
    error: Error
    result: TxnResult
    index: int
    revision: int
    read_revision: int
    def __init__(self, error: _Optional[_Union[Error, _Mapping]] = ..., result: _Optional[_Union[TxnResult, _Mapping]] = ..., index: _Optional[int] = ..., revision: _Optional[int] = ..., read_revision: _Optional[int] = ...) -> None: ...

class ScanRequest(_message.Message):
    __slots__ = ("start", "end", "prefix", "limit", "consistency", "group", "max_staleness_ms", "revision")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    MAX_STALENESS_MS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    start: bytes
    end: bytes
    prefix: bytes
    limit: int
    consistency: Consistency
    group: int
    max_staleness_ms: int
    revision: int
    def __init__(self, start: _Optional[bytes] = ..., end: _Optional[bytes] = ..., prefix: _Optional[bytes] = ..., limit: _Optional[int] = ..., consistency: _Optional[_Union[Consistency, str]] = ..., group: _Optional[int] = ..., max_staleness_ms: _Optional[int] = ..., revision: _Optional[int] = ...) -> None: ...

class KeyValue(_message.Message):
    __slots__ = ("key", "value", "create_revision", "mod_revision", "version")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    CREATE_REVISION_FIELD_NUMBER: _ClassVar[int]
    MOD_REVISION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    def __init__(self, key: _Optional[bytes] = ..., value: _Optional[bytes] = ..., create_revision: _Optional[int] = ..., mod_revision: _Optional[int] = ..., version: _Optional[int] = ...) -> None: ...

class ScanResponse(_message.Message):
    __slots__ = ("error", "items", "more", "owned_lo", "owned_hi", "index", "staleness_ms", "node_id", "revision")
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    OWNED_LO_FIELD_NUMBER: _ClassVar[int]
    OWNED_HI_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    STALENESS_MS_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    error: Error
    items: _containers.RepeatedCompositeFieldContainer[KeyValue]
    more: bool
    owned_lo: _containers.RepeatedScalarFieldContainer[int]
    owned_hi: _containers.RepeatedScalarFieldContainer[int]
    index: int
    staleness_ms: int
    node_id: int
    revision: int
    def __init__(self, error: _Optional[_Union[Error, _Mapping]] = ..., items: _Optional[_Iterable[_Union[KeyValue, _Mapping]]] = ..., more: _Optional[bool] = ..., owned_lo: _Optional[_Iterable[int]] = ..., owned_hi: _Optional[_Iterable[int]] = ..., index: _Optional[int] = ..., staleness_ms: _Optional[int] = ..., node_id: _Optional[int] = ..., revision: _Optional[int] = ...) -> None: ...

class Op(_message.Message):
    __slots__ = ("id", "timeout_ms", "get", "put", "delete", "cas", "scan", "txn")
    ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    GET_FIELD_NUMBER: _ClassVar[int]
    PUT_FIELD_NUMBER: _ClassVar[int]
    DELETE_FIELD_NUMBER: _ClassVar[int]
    CAS_FIELD_NUMBER: _ClassVar[int]
    SCAN_FIELD_NUMBER: _ClassVar[int]
    TXN_FIELD_NUMBER: _ClassVar[int]
    id: int
    timeout_ms: int
    get: GetRequest
    put: PutRequest
    delete: DeleteRequest
    cas: CasRequest
    scan: ScanRequest
    txn: TxnRequest
    def __init__(self, id: _Optional[int] = ..., timeout_ms: _Optional[int] = ..., get: _Optional[_Union[GetRequest, _Mapping]] = ..., put: _Optional[_Union[PutRequest, _Mapping]] = ..., delete: _Optional[_Union[DeleteRequest, _Mapping]] = ..., cas: _Optional[_Union[CasRequest, _Mapping]] = ..., scan: _Optional[_Union[ScanRequest, _Mapping]] = ..., txn: _Optional[_Union[TxnRequest, _Mapping]] = ...) -> None: ...

class OpResult(_message.Message):
    __slots__ = ("id", "get", "put", "delete", "cas", "scan", "txn")
    ID_FIELD_NUMBER: _ClassVar[int]
    GET_FIELD_NUMBER: _ClassVar[int]
    PUT_FIELD_NUMBER: _ClassVar[int]
    DELETE_FIELD_NUMBER: _ClassVar[int]
    CAS_FIELD_NUMBER: _ClassVar[int]
    SCAN_FIELD_NUMBER: _ClassVar[int]
    TXN_FIELD_NUMBER: _ClassVar[int]
    id: int
    get: GetResponse
    put: PutResponse
    delete: DeleteResponse
    cas: CasResponse
    scan: ScanResponse
    txn: TxnResponse
    def __init__(self, id: _Optional[int] = ..., get: _Optional[_Union[GetResponse, _Mapping]] = ..., put: _Optional[_Union[PutResponse, _Mapping]] = ..., delete: _Optional[_Union[DeleteResponse, _Mapping]] = ..., cas: _Optional[_Union[CasResponse, _Mapping]] = ..., scan: _Optional[_Union[ScanResponse, _Mapping]] = ..., txn: _Optional[_Union[TxnResponse, _Mapping]] = ...) -> None: ...

class OpBatch(_message.Message):
    __slots__ = ("ops",)
    OPS_FIELD_NUMBER: _ClassVar[int]
    ops: _containers.RepeatedCompositeFieldContainer[Op]
    def __init__(self, ops: _Optional[_Iterable[_Union[Op, _Mapping]]] = ...) -> None: ...

class ResultBatch(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[OpResult]
    def __init__(self, results: _Optional[_Iterable[_Union[OpResult, _Mapping]]] = ...) -> None: ...

class CompactRequest(_message.Message):
    __slots__ = ("revision",)
    REVISION_FIELD_NUMBER: _ClassVar[int]
    revision: int
    def __init__(self, revision: _Optional[int] = ...) -> None: ...

class CompactResponse(_message.Message):
    __slots__ = ("error", "revision")
    ERROR_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    error: Error
    revision: int
    def __init__(self, error: _Optional[_Union[Error, _Mapping]] = ..., revision: _Optional[int] = ...) -> None: ...

class WatchCreateRequest(_message.Message):
    __slots__ = ("key", "range_end", "prefix", "start_revision", "progress_notify", "filters", "prev_kv", "watch_id", "groups", "shard_version")
    class FilterType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        NOPUT: _ClassVar[WatchCreateRequest.FilterType]
        NODELETE: _ClassVar[WatchCreateRequest.FilterType]
    NOPUT: WatchCreateRequest.FilterType
    NODELETE: WatchCreateRequest.FilterType
    KEY_FIELD_NUMBER: _ClassVar[int]
    RANGE_END_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    START_REVISION_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_NOTIFY_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    PREV_KV_FIELD_NUMBER: _ClassVar[int]
    WATCH_ID_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    SHARD_VERSION_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    range_end: bytes
    prefix: bytes
    start_revision: int
    progress_notify: bool
    filters: _containers.RepeatedScalarFieldContainer[WatchCreateRequest.FilterType]
    prev_kv: bool
    watch_id: int
    groups: _containers.RepeatedScalarFieldContainer[int]
    shard_version: int
    def __init__(self, key: _Optional[bytes] = ..., range_end: _Optional[bytes] = ..., prefix: _Optional[bytes] = ..., start_revision: _Optional[int] = ..., progress_notify: _Optional[bool] = ..., filters: _Optional[_Iterable[_Union[WatchCreateRequest.FilterType, str]]] = ..., prev_kv: _Optional[bool] = ..., watch_id: _Optional[int] = ..., groups: _Optional[_Iterable[int]] = ..., shard_version: _Optional[int] = ...) -> None: ...

class WatchCancelRequest(_message.Message):
    __slots__ = ("watch_id",)
    WATCH_ID_FIELD_NUMBER: _ClassVar[int]
    watch_id: int
    def __init__(self, watch_id: _Optional[int] = ...) -> None: ...

class WatchProgressRequest(_message.Message):
    __slots__ = ("revision",)
    REVISION_FIELD_NUMBER: _ClassVar[int]
    revision: int
    def __init__(self, revision: _Optional[int] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("create_request", "cancel_request", "progress_request")
    CREATE_REQUEST_FIELD_NUMBER: _ClassVar[int]
    CANCEL_REQUEST_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_REQUEST_FIELD_NUMBER: _ClassVar[int]
    create_request: WatchCreateRequest
    cancel_request: WatchCancelRequest
    progress_request: WatchProgressRequest
    def __init__(self, create_request: _Optional[_Union[WatchCreateRequest, _Mapping]] = ..., cancel_request: _Optional[_Union[WatchCancelRequest, _Mapping]] = ..., progress_request: _Optional[_Union[WatchProgressRequest, _Mapping]] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("type", "kv", "prev_kv")
    class EventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        PUT: _ClassVar[Event.EventType]
        DELETE: _ClassVar[Event.EventType]
    PUT: Event.EventType
    DELETE: Event.EventType
    TYPE_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    PREV_KV_FIELD_NUMBER: _ClassVar[int]
    type: Event.EventType
    kv: KeyValue
    prev_kv: KeyValue
    def __init__(self, type: _Optional[_Union[Event.EventType, str]] = ..., kv: _Optional[_Union[KeyValue, _Mapping]] = ..., prev_kv: _Optional[_Union[KeyValue, _Mapping]] = ...) -> None: ...

class WatchResponse(_message.Message):
    __slots__ = ("error", "watch_id", "created", "canceled", "compact_revision", "cancel_reason", "resume_revision", "revision", "events", "node_id")
    ERROR_FIELD_NUMBER: _ClassVar[int]
    WATCH_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    CANCELED_FIELD_NUMBER: _ClassVar[int]
    COMPACT_REVISION_FIELD_NUMBER: _ClassVar[int]
    CANCEL_REASON_FIELD_NUMBER: _ClassVar[int]
    RESUME_REVISION_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    error: Error
    watch_id: int
    created: bool
    canceled: bool
    compact_revision: int
    cancel_reason: str
    resume_revision: int
    revision: int
    events: _containers.RepeatedCompositeFieldContainer[Event]
    node_id: int
    def __init__(self, error: _Optional[_Union[Error, _Mapping]] = ..., watch_id: _Optional[int] = ..., created: _Optional[bool] = ..., canceled: _Optional[bool] = ..., compact_revision: _Optional[int] = ..., cancel_reason: _Optional[str] = ..., resume_revision: _Optional[int] = ..., revision: _Optional[int] = ..., events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ..., node_id: _Optional[int] = ...) -> None: ...

class LeaseGrantRequest(_message.Message):
    __slots__ = ("ttl", "id")
    TTL_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    ttl: int
    id: int
    def __init__(self, ttl: _Optional[int] = ..., id: _Optional[int] = ...) -> None: ...

class LeaseGrantResponse(_message.Message):
    __slots__ = ("error", "id", "ttl")
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    error: Error
    id: int
    ttl: int
    def __init__(self, error: _Optional[_Union[Error, _Mapping]] = ..., id: _Optional[int] = ..., ttl: _Optional[int] = ...) -> None: ...

class LeaseRevokeRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    def __init__(self, id: _Optional[int] = ...) -> None: ...

class LeaseRevokeResponse(_message.Message):
    __slots__ = ("error", "deleted")
    ERROR_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    error: Error
    deleted: int
    def __init__(self, error: _Optional[_Union[Error, _Mapping]] = ..., deleted: _Optional[int] = ...) -> None: ...

class LeaseKeepAliveRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    def __init__(self, id: _Optional[int] = ...) -> None: ...

class LeaseKeepAliveResponse(_message.Message):
    __slots__ = ("error", "id", "ttl")
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    error: Error
    id: int
    ttl: int
    def __init__(self, error: _Optional[_Union[Error, _Mapping]] = ..., id: _Optional[int] = ..., ttl: _Optional[int] = ...) -> None: ...

class LeaseTimeToLiveRequest(_message.Message):
    __slots__ = ("id", "keys")
    ID_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    id: int
    keys: bool
    def __init__(self, id: _Optional[int] = ..., keys: _Optional[bool] = ...) -> None: ...

class LeaseTimeToLiveResponse(_message.Message):
    __slots__ = ("error", "id", "ttl", "granted_ttl", "keys", "checked")
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    GRANTED_TTL_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    CHECKED_FIELD_NUMBER: _ClassVar[int]
    error: Error
    id: int
    ttl: int
    granted_ttl: int
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    checked: int
    def __init__(self, error: _Optional[_Union[Error, _Mapping]] = ..., id: _Optional[int] = ..., ttl: _Optional[int] = ..., granted_ttl: _Optional[int] = ..., keys: _Optional[_Iterable[bytes]] = ..., checked: _Optional[int] = ...) -> None: ...

class LeaseLeasesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LeaseLeasesResponse(_message.Message):
    __slots__ = ("error", "ids")
    ERROR_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    error: Error
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, error: _Optional[_Union[Error, _Mapping]] = ..., ids: _Optional[_Iterable[int]] = ...) -> None: ...

class LeasePutRequest(_message.Message):
    __slots__ = ("key", "value", "lease", "session", "checked")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    CHECKED_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    value: bytes
    lease: int
    session: Session
    checked: int
    def __init__(self, key: _Optional[bytes] = ..., value: _Optional[bytes] = ..., lease: _Optional[int] = ..., session: _Optional[_Union[Session, _Mapping]] = ..., checked: _Optional[int] = ...) -> None: ...
