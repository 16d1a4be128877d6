"""A stand-in for the `tensorrt` Python module, for testing our calls into TensorRT without a GPU.

It builds and runs nothing: "engines" are placeholder bytes and "inference" computes nothing. What it does copy
exactly is what our code depends on: the enum values and the return conventions of the TensorRT version it
claims, each cited by header line from NVIDIA/TensorRT:

- TensorRT 10: branch release/10.16 (headers of 10.16.0.72; the pinned 10.16.1.11 is a patch of it);
- TensorRT 11: branch main at "TensorRT 11.1 OSS Release" (headers of 11.1.0.106).

Python-binding conventions are cited from python/src/infer/pyCore.cpp (release/10.16): a C++ nullptr comes back as
None, a C++ bool as a Python bool, and a few setters raise RuntimeError instead of returning false.

Knobs (attributes of StandIn) make a call fail the way TensorRT reports it, so tests can check that every result
is looked at: `profile_index` (-1), `set_timing_cache_ok`, `lose_timing_cache`, `calibration_profile_ok`,
`reject_calibration_cache`, `refuse_address`, `refuse_shape`, `enqueue_ok`, `profile_async_ok`, `dla_cores`,
`dla_layer_types`, `place_on_dla` (False: the built engine runs everything on the GPU whatever can_run_on_DLA said),
`networks` (layers per ONNX file name), `engines` (I/O per engine file).

A DLA build's engine inspector answers with DETAILED layer information: {"Layers": [{"Name", "LayerType"}, ...]} (the
keys trex reads: tools/experimental/trt-engine-explorer/trex/parser.py:42, layer.py:35), each run of consecutive
DLA layers one layer named "{ForeignNode[first...last]}" (TensorRT's "[DlaLayer] {ForeignNode[...]}",
samples/sampleCudla/README.md:69). A foreign node's LayerType is not known here and our code does not read it.
"""

from __future__ import annotations

import enum
import json
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

V10 = "10.16.1.11"
V11 = "11.1.0.106"


def _major(version: str) -> int:
    return int(version.split(".")[0])


def enums(version: str) -> dict[str, type[enum.IntEnum]]:
    """The TensorRT enums our code touches, with the values of `version`'s headers."""
    v10 = _major(version) == 10
    # NetworkDefinitionCreationFlag: 10.16 NvInfer.h:12107 kEXPLICIT_BATCH = 0 (deprecated), :12113 kSTRONGLY_TYPED = 1;
    # 11.1 NvInfer.h:11471 kSTRONGLY_TYPED = 0 (deprecated: always strongly typed), no kEXPLICIT_BATCH.
    network_flags = {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1} if v10 else {"STRONGLY_TYPED": 0}
    # BuilderFlag: 10.16 NvInfer.h:10468 kFP16 = 0, :10472 kINT8 = 1, :10478 kGPU_FALLBACK = 3, :10514
    # kPREFER_PRECISION_CONSTRAINTS = 10 (release/10.3 NvInfer.h:8338); 11.1 NvInfer.h:9965 kGPU_FALLBACK = 3 (kFP16,
    # kINT8 and the precision-constraint flags removed with weak typing and implicit INT8).
    builder_flags = {"FP16": 0, "INT8": 1, "GPU_FALLBACK": 3, "PREFER_PRECISION_CONSTRAINTS": 10} if v10 else {"GPU_FALLBACK": 3}
    return {
        "NetworkDefinitionCreationFlag": enum.IntEnum("NetworkDefinitionCreationFlag", network_flags),
        "BuilderFlag": enum.IntEnum("BuilderFlag", builder_flags),
        # MemoryPoolType: 10.16 NvInfer.h:10837 / 11.1 NvInfer.h:10295 kWORKSPACE = 0
        "MemoryPoolType": enum.IntEnum("MemoryPoolType", {"WORKSPACE": 0}),
        # DeviceType: 10.16 NvInferRuntime.h:1351-1352 / 11.1 NvInferRuntime.h:1342-1343 kGPU = 0, kDLA = 1
        "DeviceType": enum.IntEnum("DeviceType", {"GPU": 0, "DLA": 1}),
        # ProfilingVerbosity: 10.16 NvInferRuntime.h:2974-2976 / 11.1 NvInferRuntime.h:2793-2795
        "ProfilingVerbosity": enum.IntEnum("ProfilingVerbosity", {"LAYER_NAMES_ONLY": 0, "NONE": 1, "DETAILED": 2}),
        # ExecutionContextAllocationStrategy: 10.16 NvInferRuntime.h:3108-3110 / 11.1 NvInferRuntime.h:2929-2931
        "ExecutionContextAllocationStrategy": enum.IntEnum("ExecutionContextAllocationStrategy", {"STATIC": 0, "ON_PROFILE_CHANGE": 1, "USER_MANAGED": 2}),
        # LayerInformationFormat: 10.16 NvInferRuntime.h:5257-5258 / 11.1 NvInferRuntime.h:4879-4880
        "LayerInformationFormat": enum.IntEnum("LayerInformationFormat", {"ONELINE": 0, "JSON": 1}),
        # LayerType: NvInfer.h:59 kCONVOLUTION = 0, :72 kSHUFFLE = 13, :76 kMATRIX_MULTIPLY = 17, :78 kCONSTANT = 19 (both)
        "LayerType": enum.IntEnum("LayerType", {"CONVOLUTION": 0, "SHUFFLE": 13, "MATRIX_MULTIPLY": 17, "CONSTANT": 19}),
        # TensorIOMode: 10.16 NvInferRuntimeBase.h:661-667 / 11.1 NvInferRuntimeBase.h:664-670 kNONE 0, kINPUT 1, kOUTPUT 2
        "TensorIOMode": enum.IntEnum("TensorIOMode", {"NONE": 0, "INPUT": 1, "OUTPUT": 2}),
        # DataType: 10.16 NvInferRuntimeBase.h:148-194 / 11.1 NvInferRuntimeBase.h:151-197 (python names: pyFoundationalTypes.cpp:179-191)
        "DataType": enum.IntEnum("DataType", {"FLOAT": 0, "HALF": 1, "INT8": 2, "INT32": 3, "BOOL": 4, "UINT8": 5, "FP8": 6, "BF16": 7,
                                              "INT64": 8, "INT4": 9, "FP4": 10, "E8M0": 11}),
    }


# ---- network (what the ONNX parser produces) -------------------------------------------------------
@dataclass
class Tensor:
    name: str
    dtype: str = "FLOAT"


@dataclass
class Layer:
    name: str
    type: enum.IntEnum
    inputs: list[Tensor | None]
    outputs: list[Tensor]

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    @property
    def num_outputs(self) -> int:
        return len(self.outputs)

    def get_input(self, i: int) -> Tensor | None:
        return self.inputs[i]

    def get_output(self, i: int) -> Tensor:
        return self.outputs[i]


class Network:
    def __init__(self, flags: int, layers: list[Layer]):
        self.flags, self.layers = flags, layers
        self.source = ""  # the ONNX file parsed into it

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def get_layer(self, i: int) -> Layer:
        return self.layers[i]


def layers_from(lt, spec: list[tuple[str, str, list[str], str]]) -> list[Layer]:
    """[(layer name, LayerType name, input tensor names, output tensor name)] -> layers sharing Tensor objects."""
    tensors: dict[str, Tensor] = {}

    def t(name: str) -> Tensor:
        return tensors.setdefault(name, Tensor(name))

    return [Layer(n, lt[kind], [t(i) for i in ins], [t(out)]) for n, kind, ins, out in spec]


def default_layers(lt) -> list[Layer]:
    """A matmul over a network input with shuffled constant weights: what the parser makes of MatMul(x, W)."""
    return layers_from(lt, [("w", "CONSTANT", [], "weight"), ("w_shuffle", "SHUFFLE", ["weight"], "(Unnamed Layer* 1) [Shuffle]_output"),
                            ("matmul", "MATRIX_MULTIPLY", ["x", "(Unnamed Layer* 1) [Shuffle]_output"], "y")])


# ---- runtime side: engines described by the tests ------------------------------------------------------
@dataclass
class EngineSpec:
    """I/O of one stand-in engine. inputs: name -> (DataType name, shape with -1, [(min, opt, max) per profile]);
    outputs: name -> (DataType name, shape function of the context's input shapes)."""

    inputs: dict[str, tuple[str, tuple[int, ...], list[tuple[tuple[int, ...], ...]]]]
    outputs: dict[str, tuple[str, Callable[[dict], tuple[int, ...]]]]
    memory: list[int] = field(default_factory=lambda: [1 << 20])  # activation bytes per profile
    # inputs -> outputs, run at enqueue on the bound device buffers when the test gives the stand-in a `Device`
    compute: Callable[[dict], dict] | None = None

    @property
    def num_profiles(self) -> int:
        return max(1, len(next(iter(self.inputs.values()))[2]) if self.inputs else 1)


class StandIn:
    def __init__(self, version: str = V10):
        self.version = version
        self.calls: list[tuple] = []
        self.profile_index: int | None = None  # None: the next index; -1: TensorRT refused the profile
        self.set_timing_cache_ok = True
        self.lose_timing_cache = False
        self.calibration_profile_ok = True
        self.reject_calibration_cache = False
        self.refuse_address: set[str] = set()
        self.refuse_shape: set[str] = set()
        self.enqueue_ok = True
        self.profile_async_ok = True
        self.dla_cores = 0
        self.dla_layer_types = {"CONVOLUTION"}
        self.place_on_dla = True
        self.built: dict[str, list[tuple[str, str, bool]]] = {}  # ONNX name -> [(layer, type, on DLA)] of DLA builds
        self.device: Device | None = None  # device memory computing engines read and write (see Device)
        self.before_enqueue: Callable[[object], None] | None = None  # called with the context at every enqueue
        self.networks: dict[str, list[tuple[str, str, list[str], str]]] = {}
        self.engines: dict[str, EngineSpec] = {}
        self.contexts: list = []
        self.module = self._module()

    def _module(self) -> types.ModuleType:
        sim = self
        m = types.ModuleType("tensorrt")
        m.__version__ = self.version
        for name, e in enums(self.version).items():
            setattr(m, name, e)
        lt = m.LayerType

        class Logger:
            # ILogger::Severity: 10.16 NvInferRuntime.h:1598-1602 / 11.1 NvInferRuntime.h:1593-1597 (kWARNING = 2)
            INTERNAL_ERROR, ERROR, WARNING = 0, 1, 2

            def __init__(self, severity):
                pass

        class TimingCache:
            """Serialized as b'TC' + one byte per build that used it; create_timing_cache returns None (C++ nullptr,
            NvInfer.h:11652) for bytes it cannot read, as TensorRT does for a corrupt or foreign cache."""

            def __init__(self, entries: int):
                self.entries = entries

            def serialize(self):
                return b"TC" + bytes([self.entries])

        class Profile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, lo, opt, hi):
                # pyCore.cpp:36-44: raises RuntimeError when min/opt/max are inconsistent
                if not all(len(a) == len(b) and all(x <= y for x, y in zip(a, b)) for a, b in ((lo, opt), (opt, hi))):
                    raise RuntimeError("Shape provided for min is inconsistent with other shapes.")
                self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

        class Config:
            def __init__(self):
                self.profiles: list[Profile] = []
                self.cache = None
                self.flags: list = []
                self.default_device_type = m.DeviceType.GPU
                self.int8_calibrator = None

            def set_memory_pool_limit(self, pool, size):
                sim.calls.append(("pool", pool.name, size))

            def set_flag(self, flag):
                self.flags.append(flag)
                sim.calls.append(("flag", flag.name))

            def create_timing_cache(self, data):
                data = bytes(data)
                sim.calls.append(("create_timing_cache", data))
                if data == b"":
                    return TimingCache(0)
                if data.startswith(b"TC") and len(data) == 3:
                    return TimingCache(data[2])
                return None

            def set_timing_cache(self, cache, ignore_mismatch):
                ok = sim.set_timing_cache_ok  # NvInfer.h:11675: true if set successfully, false otherwise
                if ok:
                    self.cache = cache
                return ok

            def get_timing_cache(self):
                return None if sim.lose_timing_cache else self.cache  # NvInfer.h:11685: a pointer that may be null

            def add_optimization_profile(self, profile):
                sim.calls.append(("profile", dict(profile.shapes)))
                if sim.profile_index is not None:
                    return sim.profile_index  # NvInfer.h:11427-11430: the profile's index, or -1 if it is not valid
                self.profiles.append(profile)
                return len(self.profiles) - 1

            def set_calibration_profile(self, profile):
                sim.calls.append(("calibration_profile", dict(profile.shapes)))
                return sim.calibration_profile_ok  # NvInfer.h:11508: true if set correctly

            def can_run_on_DLA(self, layer):
                return self.default_device_type == m.DeviceType.DLA and layer.type.name in sim.dla_layer_types

            def __setattr__(self, name, value):
                if name in ("builder_optimization_level", "DLA_core", "profiling_verbosity", "default_device_type"):
                    sim.calls.append((name, value))
                object.__setattr__(self, name, value)

        class Parser:
            num_errors = 0

            def __init__(self, network, logger):
                self.network = network

            def parse_from_file(self, path):
                name = Path(path).name
                sim.calls.append(("parse", name, self.network.flags))
                spec = sim.networks.get(name)
                self.network.layers = layers_from(lt, spec) if spec is not None else default_layers(lt)
                self.network.source = name
                return True

        class Builder:
            def __init__(self, logger):
                pass

            @property
            def num_DLA_cores(self):
                return sim.dla_cores

            def create_network(self, flags):
                return Network(flags, [])

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                calibrator = config.int8_calibrator
                if calibrator is not None:
                    cache = calibrator.read_calibration_cache()
                    if sim.reject_calibration_cache or not cache:
                        # a cache TensorRT does not use means calibration: it asks for batches (pyInt8Doc.h, get_batch)
                        if calibrator.get_batch(["x"]) is None:
                            return None
                if config.cache is not None:
                    config.cache.entries += 1  # the build adds its timings to the attached cache
                if config.default_device_type == m.DeviceType.DLA and getattr(config, "profiling_verbosity", None) == m.ProfilingVerbosity.DETAILED:
                    sim.built[network.source] = [(x.name, x.type.name, sim.place_on_dla and config.can_run_on_DLA(x)) for x in network.layers]
                sim.calls.append(("build", network.source))
                return f"standin:{network.source}".encode()  # an IHostMemory stand-in: a buffer of placeholder bytes

        class IInt8Calibrator:
            def __init__(self):
                pass

        m.Logger, m.Builder, m.OnnxParser = Logger, Builder, Parser
        if _major(self.version) == 10:  # implicit INT8 calibrators exist in TensorRT 10 only (pyInt8.cpp:330, :345)
            m.IInt8EntropyCalibrator2 = type("IInt8EntropyCalibrator2", (IInt8Calibrator,), {})
            m.IInt8MinMaxCalibrator = type("IInt8MinMaxCalibrator", (IInt8Calibrator,), {})
        m.Runtime = self._runtime_class(m)
        return m

    # ---- runtime ------------------------------------------------------------------------------------
    def _runtime_class(self, m):
        sim = self

        class Context:
            def __init__(self, spec: EngineSpec, strategy):
                self.spec, self.strategy = spec, strategy
                self.memory = None
                self.profile = 0
                self.shapes: dict[str, tuple] = {}
                self.addresses: dict[str, int] = {}
                sim.contexts.append(self)

            def set_device_memory(self, memory, size):  # pyCore.cpp:359 (setDeviceMemoryV2), returns nothing
                self.memory = (memory, size)

            def set_optimization_profile_async(self, index, stream):
                if not sim.profile_async_ok:  # pyCore.cpp:346-350: raises instead of returning false
                    raise RuntimeError("Error in set optimization profile async.")
                self.profile = index
                return True

            def set_input_shape(self, name, shape):  # NvInferRuntime.h:4497: false when refused
                sim.calls.append(("shape", id(self), name, tuple(shape)))
                if name in sim.refuse_shape or name not in self.spec.inputs:
                    return False
                lo, _, hi = self.spec.inputs[name][2][self.profile]
                if len(shape) != len(lo) or not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
                    return False
                self.shapes[name] = tuple(shape)
                return True

            def get_tensor_shape(self, name):
                if name in self.spec.inputs:
                    return self.shapes.get(name, self.spec.inputs[name][1])
                return self.spec.outputs[name][1](self.shapes)

            def set_tensor_address(self, name, ptr):  # NvInferRuntime.h:4764: false when refused
                sim.calls.append(("address", id(self), name))
                ok = name not in sim.refuse_address and (name in self.spec.inputs or name in self.spec.outputs)
                if ok:
                    self.addresses[name] = int(ptr)
                return ok

            def execute_async_v3(self, stream_handle):  # NvInferRuntime.h:5025: false if not enqueued
                sim.calls.append(("enqueue", id(self), self.profile))
                if sim.before_enqueue is not None:
                    sim.before_enqueue(self)
                if sim.enqueue_ok and self.spec.compute is not None and sim.device is not None:
                    dt = {n: nptype(k) for n, (k, *_) in {**self.spec.inputs, **self.spec.outputs}.items()}
                    feed = {n: sim.device.read(self.addresses[n], self.shapes[n], dt[n]) for n in self.spec.inputs}
                    for n, value in self.spec.compute(feed).items():
                        sim.device.write(self.addresses[n], np.ascontiguousarray(value, dtype=dt[n]))
                return sim.enqueue_ok

        class Engine:
            def __init__(self, spec: EngineSpec, key: str = ""):
                self.spec, self.key = spec, key
                self.names = [*spec.inputs, *spec.outputs]

            @property
            def num_io_tensors(self):
                return len(self.names)

            def get_tensor_name(self, i):
                return self.names[i]

            def get_tensor_mode(self, name):
                return m.TensorIOMode.INPUT if name in self.spec.inputs else m.TensorIOMode.OUTPUT

            def get_tensor_dtype(self, name):
                kind = self.spec.inputs[name][0] if name in self.spec.inputs else self.spec.outputs[name][0]
                return m.DataType[kind]

            def get_tensor_shape(self, name):
                return self.spec.inputs[name][1] if name in self.spec.inputs else (-1,)

            def get_tensor_profile_shape(self, name, profile):
                return self.spec.inputs[name][2][profile]

            @property
            def num_optimization_profiles(self):
                return self.spec.num_profiles

            @property
            def device_memory_size_v2(self):  # the maximum over all profiles (NvInferRuntime.h:3406-3419)
                return max(self.spec.memory)

            def create_execution_context(self, strategy=m.ExecutionContextAllocationStrategy.STATIC):
                return Context(self.spec, strategy)

            def create_engine_inspector(self):
                spec, built = self.spec, sim.built.get(self.key)

                class Inspector:
                    def get_engine_information(self, fmt):
                        if built is None:  # LAYER_NAMES_ONLY: layer names as strings
                            return json.dumps({"Layers": [f"standin layer of {', '.join(spec.inputs)}"], "format": int(fmt)})
                        layers, run = [], []
                        for name, kind, on_dla in [*built, ("", "", False)]:
                            if on_dla:
                                run.append(name)
                                continue
                            if run:
                                layers.append({"Name": f"{{ForeignNode[{run[0]}...{run[-1]}]}}", "LayerType": "?"})
                                run = []
                            if name:
                                layers.append({"Name": name, "LayerType": kind})
                        return json.dumps({"Layers": layers, "Bindings": list(spec.inputs)})

                return Inspector()

        class Runtime:
            def __init__(self, logger):
                self.DLA_core = -1  # IRuntime::setDLACore: defaults to -1 (NvInferRuntime.h:1871)

            def deserialize_cuda_engine(self, data):
                key = bytes(data).decode(errors="replace").removeprefix("standin:")
                sim.calls.append(("deserialize", key, self.DLA_core))
                return Engine(sim.engines[key], key) if key in sim.engines else None

        return Runtime


# ---- a device for computing engines ---------------------------------------------------------------------
def nptype(kind: str) -> np.dtype:
    return np.dtype({"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32, "INT64": np.int64, "INT8": np.int8, "BOOL": np.bool_, "UINT8": np.uint8}[kind])


class Device:
    """Host memory standing in for device memory, so engines with a `compute` really move data: DeviceBuffer,
    HostBuffer and Stream with ppllava_edge/device.py's interface (copies happen at once; synchronize does nothing), and the
    engines read their inputs from, and write their outputs to, the addresses bound with set_tensor_address."""

    def __init__(self) -> None:
        self.memory: dict[int, bytearray] = {}  # base address -> bytes
        self._next = 1 << 32
        device = self

        class Stream:
            handle = 7

            def synchronize(self) -> None:
                pass

            def close(self) -> None:
                pass

        class DeviceBuffer:
            def __init__(self, nbytes: int) -> None:
                self.nbytes = int(nbytes)
                self.ptr = device._next
                device._next += (max(self.nbytes, 1) + 0xFFFF) & ~0xFFFF
                device.memory[self.ptr] = bytearray(max(self.nbytes, 1))

            def copy_from_host(self, array, stream, offset: int = 0) -> None:
                data = np.ascontiguousarray(array).tobytes()
                assert offset + len(data) <= self.nbytes, "copy past the end of a device buffer"
                device.memory[self.ptr][offset : offset + len(data)] = data

            def copy_to_host(self, array, stream, offset: int = 0) -> None:
                raw = device.memory[self.ptr][offset : offset + array.nbytes]
                array[...] = np.frombuffer(bytes(raw), array.dtype).reshape(array.shape)

            def copy_from_device(self, src, nbytes, stream, dst_offset: int = 0, src_offset: int = 0) -> None:
                device.memory[self.ptr][dst_offset : dst_offset + nbytes] = device.memory[src.ptr][src_offset : src_offset + nbytes]

            def free(self) -> None:
                self.ptr = 0

        class HostBuffer:
            def __init__(self, shape, dtype) -> None:
                self.array = np.zeros(shape, dtype)

            def free(self) -> None:
                pass

        self.Stream, self.DeviceBuffer, self.HostBuffer = Stream, DeviceBuffer, HostBuffer

    def _locate(self, ptr: int, nbytes: int) -> tuple[bytearray, int]:
        base = max(b for b in self.memory if b <= ptr)
        assert ptr - base + nbytes <= len(self.memory[base]), "a tensor past the end of its device buffer"
        return self.memory[base], ptr - base

    def read(self, ptr: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        n = int(np.prod(shape)) * dtype.itemsize
        buf, off = self._locate(ptr, n)
        return np.frombuffer(bytes(buf[off : off + n]), dtype).reshape(shape)

    def write(self, ptr: int, array: np.ndarray) -> None:
        buf, off = self._locate(ptr, array.nbytes)
        buf[off : off + array.nbytes] = array.tobytes()


def onnx_engine_spec(onnx: Path, graph: dict, profiles: list[dict]) -> EngineSpec:
    """An engine that computes what its ONNX graph computes (with ONNX Runtime on the CPU): I/O types from the graph,
    input shapes and profiles from engines.json `profiles`, output shapes from export.json's dims of `graph`."""
    import onnxruntime as ort

    from ppllava_edge.engine.profiles import eval_dim

    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    kinds = {"tensor(float)": "FLOAT", "tensor(float16)": "HALF", "tensor(int64)": "INT64", "tensor(int32)": "INT32"}
    dims = {io["name"]: io["dims"] for io in (*graph["inputs"], *graph["outputs"])}
    inputs = {i.name: (kinds[i.type], tuple(d if isinstance(d, int) else -1 for d in dims[i.name]),
                       [tuple(tuple(p["shapes"][i.name][k]) for k in ("min", "opt", "max")) for p in profiles]) for i in session.get_inputs()}

    def symbols(shapes: dict) -> dict:
        return {d: v for name, shape in shapes.items() for d, v in zip(dims[name], shape) if isinstance(d, str) and d.isidentifier()}

    def shape_of(name: str) -> Callable[[dict], tuple[int, ...]]:
        return lambda shapes: tuple(eval_dim(d, symbols(shapes)) for d in dims[name])

    outputs = {o.name: (kinds[o.type], shape_of(o.name)) for o in session.get_outputs()}
    names = [o.name for o in session.get_outputs()]
    return EngineSpec(inputs, outputs, compute=lambda feed: dict(zip(names, session.run(names, feed))))
