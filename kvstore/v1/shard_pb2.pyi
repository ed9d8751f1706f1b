from kvstore.v1 import kv_pb2 as _kv_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MoveState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MOVE_PENDING: _ClassVar[MoveState]
    MOVE_FROZEN: _ClassVar[MoveState]
    MOVE_FLIPPED: _ClassVar[MoveState]
MOVE_PENDING: MoveState
MOVE_FROZEN: MoveState
MOVE_FLIPPED: MoveState

class ShardGroup(_message.Message):
    __slots__ = ("id", "voters", "learners", "bootstrap")
    ID_FIELD_NUMBER: _ClassVar[int]
    VOTERS_FIELD_NUMBER: _ClassVar[int]
    LEARNERS_FIELD_NUMBER: _ClassVar[int]
    BOOTSTRAP_FIELD_NUMBER: _ClassVar[int]
    id: int
    voters: _containers.RepeatedScalarFieldContainer[int]
    learners: _containers.RepeatedScalarFieldContainer[int]
    bootstrap: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, id: _Optional[int] = ..., voters: _Optional[_Iterable[int]] = ..., learners: _Optional[_Iterable[int]] = ..., bootstrap: _Optional[_Iterable[int]] = ...) -> None: ...

class RangeMove(_message.Message):
    __slots__ = ("id", "source", "target", "lo", "hi", "state")
    ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    LO_FIELD_NUMBER: _ClassVar[int]
    HI_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    id: int
    source: int
    target: int
    lo: _containers.RepeatedScalarFieldContainer[int]
    hi: _containers.RepeatedScalarFieldContainer[int]
    state: MoveState
    def __init__(self, id: _Optional[int] = ..., source: _Optional[int] = ..., target: _Optional[int] = ..., lo: _Optional[_Iterable[int]] = ..., hi: _Optional[_Iterable[int]] = ..., state: _Optional[_Union[MoveState, str]] = ...) -> None: ...

class ShardMap(_message.Message):
    __slots__ = ("version", "replication", "vnodes", "groups", "points", "owners", "route_lo", "route_hi", "route_group", "moves", "next_move", "nodes", "next_group", "initial_groups", "clients")
    class NodesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: str
        def __init__(self, key: _Optional[int] = ..., value: _Optional[str] = ...) -> None: ...
    class ClientsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: str
        def __init__(self, key: _Optional[int] = ..., value: _Optional[str] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REPLICATION_FIELD_NUMBER: _ClassVar[int]
    VNODES_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    POINTS_FIELD_NUMBER: _ClassVar[int]
    OWNERS_FIELD_NUMBER: _ClassVar[int]
    ROUTE_LO_FIELD_NUMBER: _ClassVar[int]
    ROUTE_HI_FIELD_NUMBER: _ClassVar[int]
    ROUTE_GROUP_FIELD_NUMBER: _ClassVar[int]
    MOVES_FIELD_NUMBER: _ClassVar[int]
    NEXT_MOVE_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    NEXT_GROUP_FIELD_NUMBER: _ClassVar[int]
    INITIAL_GROUPS_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_FIELD_NUMBER: _ClassVar[int]
    version: int
    replication: int
    vnodes: int
    groups: _containers.RepeatedCompositeFieldContainer[ShardGroup]
    points: _containers.RepeatedScalarFieldContainer[int]
    owners: _containers.RepeatedScalarFieldContainer[int]
    route_lo: _containers.RepeatedScalarFieldContainer[int]
    route_hi: _containers.RepeatedScalarFieldContainer[int]
    route_group: _containers.RepeatedScalarFieldContainer[int]
    moves: _containers.RepeatedCompositeFieldContainer[RangeMove]
    next_move: int
    nodes: _containers.ScalarMap[int, str]
    next_group: int
    initial_groups: int
    clients: _containers.ScalarMap[int, str]
    def __init__(self, version: _Optional[int] = ..., replication: _Optional[int] = ..., vnodes: _Optional[int] = ..., groups: _Optional[_Iterable[_Union[ShardGroup, _Mapping]]] = ..., points: _Optional[_Iterable[int]] = ..., owners: _Optional[_Iterable[int]] = ..., route_lo: _Optional[_Iterable[int]] = ..., route_hi: _Optional[_Iterable[int]] = ..., route_group: _Optional[_Iterable[int]] = ..., moves: _Optional[_Iterable[_Union[RangeMove, _Mapping]]] = ..., next_move: _Optional[int] = ..., nodes: _Optional[_Mapping[int, str]] = ..., next_group: _Optional[int] = ..., initial_groups: _Optional[int] = ..., clients: _Optional[_Mapping[int, str]] = ...) -> None: ...

class GetShardMapRequest(_message.Message):
    __slots__ = ("known_version",)
    KNOWN_VERSION_FIELD_NUMBER: _ClassVar[int]
    known_version: int
    def __init__(self, known_version: _Optional[int] = ...) -> None: ...

class GetShardMapResponse(_message.Message):
    __slots__ = ("error", "map", "version")
    ERROR_FIELD_NUMBER: _ClassVar[int]
    MAP_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    error: _kv_pb2.Error
    map: bytes
    version: int
    def __init__(self, error: _Optional[_Union[_kv_pb2.Error, _Mapping]] = ..., map: _Optional[bytes] = ..., version: _Optional[int] = ...) -> None: ...

class GroupProposeRequest(_message.Message):
    __slots__ = ("group", "command", "conf_change", "read_barrier", "transfer", "transfer_to", "cluster_id", "from_node", "retention_keep")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    CONF_CHANGE_FIELD_NUMBER: _ClassVar[int]
    READ_BARRIER_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_TO_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_NODE_FIELD_NUMBER: _ClassVar[int]
    RETENTION_KEEP_FIELD_NUMBER: _ClassVar[int]
    group: int
    command: bytes
    conf_change: bytes
    read_barrier: bool
    transfer: bool
    transfer_to: int
    cluster_id: str
    from_node: int
    retention_keep: int
    def __init__(self, group: _Optional[int] = ..., command: _Optional[bytes] = ..., conf_change: _Optional[bytes] = ..., read_barrier: _Optional[bool] = ..., transfer: _Optional[bool] = ..., transfer_to: _Optional[int] = ..., cluster_id: _Optional[str] = ..., from_node: _Optional[int] = ..., retention_keep: _Optional[int] = ...) -> None: ...

class GroupProposeResponse(_message.Message):
    __slots__ = ("error", "result", "index", "revision")
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    error: _kv_pb2.Error
    result: bytes
    index: int
    revision: int
    def __init__(self, error: _Optional[_Union[_kv_pb2.Error, _Mapping]] = ..., result: _Optional[bytes] = ..., index: _Optional[int] = ..., revision: _Optional[int] = ...) -> None: ...

class ExportRangeRequest(_message.Message):
    __slots__ = ("group", "lo", "hi", "chunk_bytes", "cluster_id", "from_node")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    LO_FIELD_NUMBER: _ClassVar[int]
    HI_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_NODE_FIELD_NUMBER: _ClassVar[int]
    group: int
    lo: _containers.RepeatedScalarFieldContainer[int]
    hi: _containers.RepeatedScalarFieldContainer[int]
    chunk_bytes: int
    cluster_id: str
    from_node: int
    def __init__(self, group: _Optional[int] = ..., lo: _Optional[_Iterable[int]] = ..., hi: _Optional[_Iterable[int]] = ..., chunk_bytes: _Optional[int] = ..., cluster_id: _Optional[str] = ..., from_node: _Optional[int] = ...) -> None: ...

class ExportRangeChunk(_message.Message):
    __slots__ = ("error", "records", "keys")
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    error: _kv_pb2.Error
    records: bytes
    keys: int
    def __init__(self, error: _Optional[_Union[_kv_pb2.Error, _Mapping]] = ..., records: _Optional[bytes] = ..., keys: _Optional[int] = ...) -> None: ...

class ShardOpRequest(_message.Message):
    __slots__ = ("op", "group", "wait", "timeout")
    class Op(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        INFO: _ClassVar[ShardOpRequest.Op]
        ADD_GROUP: _ClassVar[ShardOpRequest.Op]
        REMOVE_GROUP: _ClassVar[ShardOpRequest.Op]
        REBALANCE: _ClassVar[ShardOpRequest.Op]
    INFO: ShardOpRequest.Op
    ADD_GROUP: ShardOpRequest.Op
    REMOVE_GROUP: ShardOpRequest.Op
    REBALANCE: ShardOpRequest.Op
    OP_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    op: ShardOpRequest.Op
    group: int
    wait: bool
    timeout: float
    def __init__(self, op: _Optional[_Union[ShardOpRequest.Op, str]] = ..., group: _Optional[int] = ..., wait: _Optional[bool] = ..., timeout: _Optional[float] = ...) -> None: ...

class GroupInfo(_message.Message):
    __slots__ = ("id", "voters", "learners", "leader_id", "keys", "ranges", "share", "applied")
    ID_FIELD_NUMBER: _ClassVar[int]
    VOTERS_FIELD_NUMBER: _ClassVar[int]
    LEARNERS_FIELD_NUMBER: _ClassVar[int]
    LEADER_ID_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    RANGES_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    id: int
    voters: _containers.RepeatedScalarFieldContainer[int]
    learners: _containers.RepeatedScalarFieldContainer[int]
    leader_id: int
    keys: int
    ranges: int
    share: float
    applied: int
    def __init__(self, id: _Optional[int] = ..., voters: _Optional[_Iterable[int]] = ..., learners: _Optional[_Iterable[int]] = ..., leader_id: _Optional[int] = ..., keys: _Optional[int] = ..., ranges: _Optional[int] = ..., share: _Optional[float] = ..., applied: _Optional[int] = ...) -> None: ...

class ShardOpResponse(_message.Message):
    __slots__ = ("error", "message", "version", "groups", "moves_pending")
    ERROR_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    MOVES_PENDING_FIELD_NUMBER: _ClassVar[int]
    error: _kv_pb2.Error
    message: str
    version: int
    groups: _containers.RepeatedCompositeFieldContainer[GroupInfo]
    moves_pending: int
    def __init__(self, error: _Optional[_Union[_kv_pb2.Error, _Mapping]] = ..., message: _Optional[str] = ..., version: _Optional[int] = ..., groups: _Optional[_Iterable[_Union[GroupInfo, _Mapping]]] = ..., moves_pending: _Optional[int] = ...) -> None: ...
