from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DeviceKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DEVICE_KIND_UNSPECIFIED: _ClassVar[DeviceKind]
    DEVICE_KIND_GPU: _ClassVar[DeviceKind]
    DEVICE_KIND_NPU: _ClassVar[DeviceKind]
    DEVICE_KIND_CPU: _ClassVar[DeviceKind]
DEVICE_KIND_UNSPECIFIED: DeviceKind
DEVICE_KIND_GPU: DeviceKind
DEVICE_KIND_NPU: DeviceKind
DEVICE_KIND_CPU: DeviceKind

class DeviceInfo(_message.Message):
    __slots__ = ("uuid", "index", "kind", "vendor", "model", "backend", "power_limit_min_w", "power_limit_max_w", "power_limit_default_w", "sm_clock_min_mhz", "sm_clock_max_mhz", "memory_total_bytes", "power_limit_settable", "clocks_lockable")
    UUID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    VENDOR_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    POWER_LIMIT_MIN_W_FIELD_NUMBER: _ClassVar[int]
    POWER_LIMIT_MAX_W_FIELD_NUMBER: _ClassVar[int]
    POWER_LIMIT_DEFAULT_W_FIELD_NUMBER: _ClassVar[int]
    SM_CLOCK_MIN_MHZ_FIELD_NUMBER: _ClassVar[int]
    SM_CLOCK_MAX_MHZ_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    POWER_LIMIT_SETTABLE_FIELD_NUMBER: _ClassVar[int]
    CLOCKS_LOCKABLE_FIELD_NUMBER: _ClassVar[int]
    uuid: str
    index: int
    kind: DeviceKind
    vendor: str
    model: str
    backend: str
    power_limit_min_w: float
    power_limit_max_w: float
    power_limit_default_w: float
    sm_clock_min_mhz: int
    sm_clock_max_mhz: int
    memory_total_bytes: int
    power_limit_settable: bool
    clocks_lockable: bool
    def __init__(self, uuid: _Optional[str] = ..., index: _Optional[int] = ..., kind: _Optional[_Union[DeviceKind, str]] = ..., vendor: _Optional[str] = ..., model: _Optional[str] = ..., backend: _Optional[str] = ..., power_limit_min_w: _Optional[float] = ..., power_limit_max_w: _Optional[float] = ..., power_limit_default_w: _Optional[float] = ..., sm_clock_min_mhz: _Optional[int] = ..., sm_clock_max_mhz: _Optional[int] = ..., memory_total_bytes: _Optional[int] = ..., power_limit_settable: _Optional[bool] = ..., clocks_lockable: _Optional[bool] = ...) -> None: ...

class DeviceSample(_message.Message):
    __slots__ = ("uuid", "index", "power_w", "energy_j", "power_limit_w", "power_limit_min_w", "power_limit_max_w", "sm_clock_mhz", "memory_clock_mhz", "utilization_ratio", "memory_utilization_ratio", "memory_used_bytes", "memory_total_bytes", "temperature_c", "throttle_reasons", "locked_sm_clock_min_mhz", "locked_sm_clock_max_mhz")
    UUID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    POWER_W_FIELD_NUMBER: _ClassVar[int]
    ENERGY_J_FIELD_NUMBER: _ClassVar[int]
    POWER_LIMIT_W_FIELD_NUMBER: _ClassVar[int]
    POWER_LIMIT_MIN_W_FIELD_NUMBER: _ClassVar[int]
    POWER_LIMIT_MAX_W_FIELD_NUMBER: _ClassVar[int]
    SM_CLOCK_MHZ_FIELD_NUMBER: _ClassVar[int]
    MEMORY_CLOCK_MHZ_FIELD_NUMBER: _ClassVar[int]
    UTILIZATION_RATIO_FIELD_NUMBER: _ClassVar[int]
    MEMORY_UTILIZATION_RATIO_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_C_FIELD_NUMBER: _ClassVar[int]
    THROTTLE_REASONS_FIELD_NUMBER: _ClassVar[int]
    LOCKED_SM_CLOCK_MIN_MHZ_FIELD_NUMBER: _ClassVar[int]
    LOCKED_SM_CLOCK_MAX_MHZ_FIELD_NUMBER: _ClassVar[int]
    uuid: str
    index: int
    power_w: float
    energy_j: float
    power_limit_w: float
    power_limit_min_w: float
    power_limit_max_w: float
    sm_clock_mhz: int
    memory_clock_mhz: int
    utilization_ratio: float
    memory_utilization_ratio: float
    memory_used_bytes: int
    memory_total_bytes: int
    temperature_c: float
    throttle_reasons: _containers.RepeatedScalarFieldContainer[str]
    locked_sm_clock_min_mhz: int
    locked_sm_clock_max_mhz: int
    def __init__(self, uuid: _Optional[str] = ..., index: _Optional[int] = ..., power_w: _Optional[float] = ..., energy_j: _Optional[float] = ..., power_limit_w: _Optional[float] = ..., power_limit_min_w: _Optional[float] = ..., power_limit_max_w: _Optional[float] = ..., sm_clock_mhz: _Optional[int] = ..., memory_clock_mhz: _Optional[int] = ..., utilization_ratio: _Optional[float] = ..., memory_utilization_ratio: _Optional[float] = ..., memory_used_bytes: _Optional[int] = ..., memory_total_bytes: _Optional[int] = ..., temperature_c: _Optional[float] = ..., throttle_reasons: _Optional[_Iterable[str]] = ..., locked_sm_clock_min_mhz: _Optional[int] = ..., locked_sm_clock_max_mhz: _Optional[int] = ...) -> None: ...

class InstanceSample(_message.Message):
    __slots__ = ("instance_id", "model", "role", "device_uuids", "queue_length", "running_batch", "kv_blocks_used", "kv_blocks_free", "tokens_per_s", "ttft_samples_s", "tpot_samples_s", "requests_completed_total", "tokens_generated_total")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_UUIDS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    RUNNING_BATCH_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_FREE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    TTFT_SAMPLES_S_FIELD_NUMBER: _ClassVar[int]
    TPOT_SAMPLES_S_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_COMPLETED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    TOKENS_GENERATED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    model: str
    role: str
    device_uuids: _containers.RepeatedScalarFieldContainer[str]
    queue_length: int
    running_batch: int
    kv_blocks_used: int
    kv_blocks_free: int
    tokens_per_s: float
    ttft_samples_s: _containers.RepeatedScalarFieldContainer[float]
    tpot_samples_s: _containers.RepeatedScalarFieldContainer[float]
    requests_completed_total: int
    tokens_generated_total: int
    def __init__(self, instance_id: _Optional[str] = ..., model: _Optional[str] = ..., role: _Optional[str] = ..., device_uuids: _Optional[_Iterable[str]] = ..., queue_length: _Optional[int] = ..., running_batch: _Optional[int] = ..., kv_blocks_used: _Optional[int] = ..., kv_blocks_free: _Optional[int] = ..., tokens_per_s: _Optional[float] = ..., ttft_samples_s: _Optional[_Iterable[float]] = ..., tpot_samples_s: _Optional[_Iterable[float]] = ..., requests_completed_total: _Optional[int] = ..., tokens_generated_total: _Optional[int] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("schema_version", "min_interval_ms", "device_uuids")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    MIN_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_UUIDS_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    min_interval_ms: int
    device_uuids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, schema_version: _Optional[int] = ..., min_interval_ms: _Optional[int] = ..., device_uuids: _Optional[_Iterable[str]] = ...) -> None: ...

class TelemetrySnapshot(_message.Message):
    __slots__ = ("schema_version", "node_name", "agent_version", "sequence", "timestamp_unix_ns", "devices", "instances", "device_errors")
    class DeviceErrorsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ERRORS_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    node_name: str
    agent_version: str
    sequence: int
    timestamp_unix_ns: int
    devices: _containers.RepeatedCompositeFieldContainer[DeviceSample]
    instances: _containers.RepeatedCompositeFieldContainer[InstanceSample]
    device_errors: _containers.ScalarMap[str, str]
    def __init__(self, schema_version: _Optional[int] = ..., node_name: _Optional[str] = ..., agent_version: _Optional[str] = ..., sequence: _Optional[int] = ..., timestamp_unix_ns: _Optional[int] = ..., devices: _Optional[_Iterable[_Union[DeviceSample, _Mapping]]] = ..., instances: _Optional[_Iterable[_Union[InstanceSample, _Mapping]]] = ..., device_errors: _Optional[_Mapping[str, str]] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ("schema_version",)
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    def __init__(self, schema_version: _Optional[int] = ...) -> None: ...

class AgentInfo(_message.Message):
    __slots__ = ("schema_version", "node_name", "agent_version", "devices", "control_enabled", "sampling_interval_ms")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    CONTROL_ENABLED_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    node_name: str
    agent_version: str
    devices: _containers.RepeatedCompositeFieldContainer[DeviceInfo]
    control_enabled: bool
    sampling_interval_ms: int
    def __init__(self, schema_version: _Optional[int] = ..., node_name: _Optional[str] = ..., agent_version: _Optional[str] = ..., devices: _Optional[_Iterable[_Union[DeviceInfo, _Mapping]]] = ..., control_enabled: _Optional[bool] = ..., sampling_interval_ms: _Optional[int] = ...) -> None: ...

class SetPowerLimitRequest(_message.Message):
    __slots__ = ("schema_version", "device_uuid", "power_limit_w")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    POWER_LIMIT_W_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    device_uuid: str
    power_limit_w: float
    def __init__(self, schema_version: _Optional[int] = ..., device_uuid: _Optional[str] = ..., power_limit_w: _Optional[float] = ...) -> None: ...

class ResetPowerLimitRequest(_message.Message):
    __slots__ = ("schema_version", "device_uuid")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    device_uuid: str
    def __init__(self, schema_version: _Optional[int] = ..., device_uuid: _Optional[str] = ...) -> None: ...

class PowerLimitResponse(_message.Message):
    __slots__ = ("schema_version", "device_uuid", "power_limit_w", "power_limit_min_w", "power_limit_max_w", "power_limit_default_w")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    POWER_LIMIT_W_FIELD_NUMBER: _ClassVar[int]
    POWER_LIMIT_MIN_W_FIELD_NUMBER: _ClassVar[int]
    POWER_LIMIT_MAX_W_FIELD_NUMBER: _ClassVar[int]
    POWER_LIMIT_DEFAULT_W_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    device_uuid: str
    power_limit_w: float
    power_limit_min_w: float
    power_limit_max_w: float
    power_limit_default_w: float
    def __init__(self, schema_version: _Optional[int] = ..., device_uuid: _Optional[str] = ..., power_limit_w: _Optional[float] = ..., power_limit_min_w: _Optional[float] = ..., power_limit_max_w: _Optional[float] = ..., power_limit_default_w: _Optional[float] = ...) -> None: ...

class LockClocksRequest(_message.Message):
    __slots__ = ("schema_version", "device_uuid", "sm_clock_min_mhz", "sm_clock_max_mhz")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    SM_CLOCK_MIN_MHZ_FIELD_NUMBER: _ClassVar[int]
    SM_CLOCK_MAX_MHZ_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    device_uuid: str
    sm_clock_min_mhz: int
    sm_clock_max_mhz: int
    def __init__(self, schema_version: _Optional[int] = ..., device_uuid: _Optional[str] = ..., sm_clock_min_mhz: _Optional[int] = ..., sm_clock_max_mhz: _Optional[int] = ...) -> None: ...

class ResetClocksRequest(_message.Message):
    __slots__ = ("schema_version", "device_uuid")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    device_uuid: str
    def __init__(self, schema_version: _Optional[int] = ..., device_uuid: _Optional[str] = ...) -> None: ...

class ClocksResponse(_message.Message):
    __slots__ = ("schema_version", "device_uuid", "locked", "sm_clock_min_mhz", "sm_clock_max_mhz", "sm_clock_mhz")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    LOCKED_FIELD_NUMBER: _ClassVar[int]
    SM_CLOCK_MIN_MHZ_FIELD_NUMBER: _ClassVar[int]
    SM_CLOCK_MAX_MHZ_FIELD_NUMBER: _ClassVar[int]
    SM_CLOCK_MHZ_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    device_uuid: str
    locked: bool
    sm_clock_min_mhz: int
    sm_clock_max_mhz: int
    sm_clock_mhz: int
    def __init__(self, schema_version: _Optional[int] = ..., device_uuid: _Optional[str] = ..., locked: _Optional[bool] = ..., sm_clock_min_mhz: _Optional[int] = ..., sm_clock_max_mhz: _Optional[int] = ..., sm_clock_mhz: _Optional[int] = ...) -> None: ...
