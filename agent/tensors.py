"""Protocol-neutral inference values: named numpy tensors and the V2 datatype table.

Codecs turn wire bytes into ``InferRequest`` and ``InferResponse`` into bytes;
everything between (registry, batcher, session, taps) sees only these values.
This module must not know any wire format.

BYTES tensors are numpy ``object`` arrays whose elements are ``bytes``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt

#: V2 datatype name -> numpy dtype. BYTES maps to ``object`` (elements are ``bytes``).
V2_TO_NUMPY: Final[dict[str, np.dtype[Any]]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}

#: numpy dtype -> V2 datatype name. ``str_``/``bytes_`` arrays are BYTES too.
NUMPY_TO_V2: Final[dict[np.dtype[Any], str]] = {dt: name for name, dt in V2_TO_NUMPY.items()}

#: Little-endian dtypes used when reading raw tensor bytes off the wire.
V2_TO_WIRE_DTYPE: Final[dict[str, np.dtype[Any]]] = {
    name: dt.newbyteorder("<") for name, dt in V2_TO_NUMPY.items() if name != "BYTES"
}

#: onnxruntime type string -> V2 datatype name.
ORT_TO_V2: Final[dict[str, str]] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

Array = npt.NDArray[Any]


#: Every numeric dtype in either byte order (and object) by V2 name: one lookup per call.
_V2_OF_DTYPE: Final[dict[np.dtype[Any], str]] = {
    dt.newbyteorder(order): name for dt, name in NUMPY_TO_V2.items() for order in ("<", ">", "=")
}


def v2_datatype(array: Array) -> str:
    """The V2 datatype name of a numpy array (``str`` and ``bytes`` arrays are BYTES)."""
    dtype = array.dtype
    name = _V2_OF_DTYPE.get(dtype)
    if name is not None:
        return name
    if dtype.kind in ("U", "S", "O"):
        return "BYTES"
    return NUMPY_TO_V2[dtype.newbyteorder("=")]


def element_size(datatype: str) -> int:
    """Bytes per element of a fixed-size datatype (BYTES has none: raises KeyError)."""
    return V2_TO_WIRE_DTYPE[datatype].itemsize


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """Name, V2 datatype and shape of a model input or output; -1 marks a dynamic dim."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def describe_shape(self) -> str:
        """The shape as the V2 metadata and error messages print it."""
        return "[" + ", ".join(str(d) for d in self.shape) + "]"


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    """An output the client asked for; ``binary`` None means "use the request default"."""

    name: str
    binary: bool | None = None


@dataclass(frozen=True, slots=True)
class InferRequest:
    """A decoded inference request: named input arrays plus what to send back.

    ``inputs`` keeps the order the client sent. ``outputs`` None means "all outputs".
    ``binary_output`` is the request-level default (``binary_data_output``).
    """

    inputs: dict[str, Array]
    id: str | None = None
    outputs: tuple[RequestedOutput, ...] | None = None
    binary_output: bool = False
    parameters: dict[str, Any] = field(default_factory=dict)

    def rows(self) -> int:
        """Rows in the request: the first dimension of its first input (1 for scalars)."""
        for array in self.inputs.values():
            return int(array.shape[0]) if array.ndim else 1
        return 0


@dataclass(frozen=True, slots=True)
class InferResponse:
    """An inference result ready for encoding.

    ``binary`` names the outputs to send in the binary extension; the rest go as JSON.
    """

    model_name: str
    model_version: str
    id: str
    outputs: dict[str, Array]
    binary: frozenset[str] = frozenset()
    parameters: dict[str, Any] = field(default_factory=dict)


def binary_outputs(request: InferRequest, produced: list[str]) -> frozenset[str]:
    """Which of the produced outputs the client wants in binary form."""
    if request.outputs is None:
        return frozenset(produced) if request.binary_output else frozenset()
    wanted = set()
    for out in request.outputs:
        binary = request.binary_output if out.binary is None else out.binary
        if binary:
            wanted.add(out.name)
    return frozenset(wanted)
