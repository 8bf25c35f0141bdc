from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Solver(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SOLVER_UNSPECIFIED: _ClassVar[Solver]
    EULER: _ClassVar[Solver]
    MIDPOINT: _ClassVar[Solver]
    HEUN: _ClassVar[Solver]
    RK4: _ClassVar[Solver]
    EULER_MARUYAMA: _ClassVar[Solver]

class Estimator(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ESTIMATOR_UNSPECIFIED: _ClassVar[Estimator]
    EXACT: _ClassVar[Estimator]
    HUTCHINSON: _ClassVar[Estimator]
SOLVER_UNSPECIFIED: Solver
EULER: Solver
MIDPOINT: Solver
HEUN: Solver
RK4: Solver
EULER_MARUYAMA: Solver
ESTIMATOR_UNSPECIFIED: Estimator
EXACT: Estimator
HUTCHINSON: Estimator

class Tensor(_message.Message):
    __slots__ = ("shape", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class SampleRequest(_message.Message):
    __slots__ = ("model", "version", "num_samples", "num_steps", "solver", "seed", "class_labels", "guidance_scale", "initial_noise", "trajectory_every")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    SOLVER_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    CLASS_LABELS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    INITIAL_NOISE_FIELD_NUMBER: _ClassVar[int]
    TRAJECTORY_EVERY_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    num_samples: int
    num_steps: int
    solver: Solver
    seed: int
    class_labels: _containers.RepeatedScalarFieldContainer[int]
    guidance_scale: float
    initial_noise: Tensor
    trajectory_every: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., num_samples: _Optional[int] = ..., num_steps: _Optional[int] = ..., solver: _Optional[_Union[Solver, str]] = ..., seed: _Optional[int] = ..., class_labels: _Optional[_Iterable[int]] = ..., guidance_scale: _Optional[float] = ..., initial_noise: _Optional[_Union[Tensor, _Mapping]] = ..., trajectory_every: _Optional[int] = ...) -> None: ...

class SampleResponse(_message.Message):
    __slots__ = ("samples", "model", "version", "num_steps", "network_evaluations", "seed", "queue_seconds", "compute_seconds", "trajectory")
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    NETWORK_EVALUATIONS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TRAJECTORY_FIELD_NUMBER: _ClassVar[int]
    samples: Tensor
    model: str
    version: int
    num_steps: int
    network_evaluations: int
    seed: int
    queue_seconds: float
    compute_seconds: float
    trajectory: _containers.RepeatedCompositeFieldContainer[Tensor]
    def __init__(self, samples: _Optional[_Union[Tensor, _Mapping]] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., num_steps: _Optional[int] = ..., network_evaluations: _Optional[int] = ..., seed: _Optional[int] = ..., queue_seconds: _Optional[float] = ..., compute_seconds: _Optional[float] = ..., trajectory: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ...) -> None: ...

class SampleProgress(_message.Message):
    __slots__ = ("steps_done", "num_steps", "t")
    STEPS_DONE_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    T_FIELD_NUMBER: _ClassVar[int]
    steps_done: int
    num_steps: int
    t: float
    def __init__(self, steps_done: _Optional[int] = ..., num_steps: _Optional[int] = ..., t: _Optional[float] = ...) -> None: ...

class TrajectorySnapshot(_message.Message):
    __slots__ = ("steps_done", "t", "x")
    STEPS_DONE_FIELD_NUMBER: _ClassVar[int]
    T_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    steps_done: int
    t: float
    x: Tensor
    def __init__(self, steps_done: _Optional[int] = ..., t: _Optional[float] = ..., x: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class SampleEvent(_message.Message):
    __slots__ = ("progress", "snapshot", "response")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    progress: SampleProgress
    snapshot: TrajectorySnapshot
    response: SampleResponse
    def __init__(self, progress: _Optional[_Union[SampleProgress, _Mapping]] = ..., snapshot: _Optional[_Union[TrajectorySnapshot, _Mapping]] = ..., response: _Optional[_Union[SampleResponse, _Mapping]] = ...) -> None: ...

class LogLikelihoodRequest(_message.Message):
    __slots__ = ("model", "version", "data", "num_steps", "solver", "estimator", "num_probes", "seed", "class_labels")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    SOLVER_FIELD_NUMBER: _ClassVar[int]
    ESTIMATOR_FIELD_NUMBER: _ClassVar[int]
    NUM_PROBES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    CLASS_LABELS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    data: Tensor
    num_steps: int
    solver: Solver
    estimator: Estimator
    num_probes: int
    seed: int
    class_labels: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., data: _Optional[_Union[Tensor, _Mapping]] = ..., num_steps: _Optional[int] = ..., solver: _Optional[_Union[Solver, str]] = ..., estimator: _Optional[_Union[Estimator, str]] = ..., num_probes: _Optional[int] = ..., seed: _Optional[int] = ..., class_labels: _Optional[_Iterable[int]] = ...) -> None: ...

class LogLikelihoodResponse(_message.Message):
    __slots__ = ("log_prob", "std_error", "bits_per_dim", "model", "version", "network_evaluations", "seed", "queue_seconds", "compute_seconds")
    LOG_PROB_FIELD_NUMBER: _ClassVar[int]
    STD_ERROR_FIELD_NUMBER: _ClassVar[int]
    BITS_PER_DIM_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NETWORK_EVALUATIONS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    log_prob: _containers.RepeatedScalarFieldContainer[float]
    std_error: _containers.RepeatedScalarFieldContainer[float]
    bits_per_dim: _containers.RepeatedScalarFieldContainer[float]
    model: str
    version: int
    network_evaluations: int
    seed: int
    queue_seconds: float
    compute_seconds: float
    def __init__(self, log_prob: _Optional[_Iterable[float]] = ..., std_error: _Optional[_Iterable[float]] = ..., bits_per_dim: _Optional[_Iterable[float]] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., network_evaluations: _Optional[int] = ..., seed: _Optional[int] = ..., queue_seconds: _Optional[float] = ..., compute_seconds: _Optional[float] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "serving_version", "versions", "sample_shape", "num_classes", "parameterization", "path", "path_parameters", "default_solver", "default_num_steps", "backend", "available_backends", "architecture")
    class PathParametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVING_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    PARAMETERIZATION_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    PATH_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_SOLVER_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_BACKENDS_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    serving_version: int
    versions: _containers.RepeatedScalarFieldContainer[int]
    sample_shape: _containers.RepeatedScalarFieldContainer[int]
    num_classes: int
    parameterization: str
    path: str
    path_parameters: _containers.ScalarMap[str, float]
    default_solver: Solver
    default_num_steps: int
    backend: str
    available_backends: _containers.RepeatedScalarFieldContainer[str]
    architecture: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., serving_version: _Optional[int] = ..., versions: _Optional[_Iterable[int]] = ..., sample_shape: _Optional[_Iterable[int]] = ..., num_classes: _Optional[int] = ..., parameterization: _Optional[str] = ..., path: _Optional[str] = ..., path_parameters: _Optional[_Mapping[str, float]] = ..., default_solver: _Optional[_Union[Solver, str]] = ..., default_num_steps: _Optional[int] = ..., backend: _Optional[str] = ..., available_backends: _Optional[_Iterable[str]] = ..., architecture: _Optional[str] = ...) -> None: ...

class PushModelChunk(_message.Message):
    __slots__ = ("header", "file")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    header: PushModelHeader
    file: FileChunk
    def __init__(self, header: _Optional[_Union[PushModelHeader, _Mapping]] = ..., file: _Optional[_Union[FileChunk, _Mapping]] = ...) -> None: ...

class PushModelHeader(_message.Message):
    __slots__ = ("name", "make_serving", "force")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MAKE_SERVING_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    make_serving: bool
    force: bool
    def __init__(self, name: _Optional[str] = ..., make_serving: _Optional[bool] = ..., force: _Optional[bool] = ...) -> None: ...

class FileChunk(_message.Message):
    __slots__ = ("filename", "offset", "data", "sha256")
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    filename: str
    offset: int
    data: bytes
    sha256: str
    def __init__(self, filename: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., sha256: _Optional[str] = ...) -> None: ...

class PushModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ModelInfo
    def __init__(self, model: _Optional[_Union[ModelInfo, _Mapping]] = ...) -> None: ...

class SetServingVersionRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...
