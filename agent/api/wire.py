"""The JSON shapes of the KServe V2 (Open Inference Protocol) REST API, as TypedDicts.

These describe what goes over the wire, nothing else: no functions, no validation
(the codecs validate incoming documents), no numpy. The msgpack codec uses the same
shapes. ``data`` is typed ``Any`` because it is a nested list, a numpy array on its way
to orjson, or raw bytes in msgpack.
"""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict


class RequestParameters(TypedDict, total=False):
    """Request-level ``parameters``; any other key is passed through untouched."""

    binary_data_output: bool


class TensorParameters(TypedDict, total=False):
    """Per-tensor ``parameters`` of a request input or response output."""

    binary_data_size: int


class OutputParameters(TypedDict, total=False):
    """Per-output ``parameters`` of a requested output."""

    binary_data: bool


class RequestInput(TypedDict):
    """One input tensor of an inference request."""

    name: str
    shape: list[int]
    datatype: str
    parameters: NotRequired[TensorParameters]
    data: NotRequired[Any]


class RequestedOutput(TypedDict):
    """One output the client asks for."""

    name: str
    parameters: NotRequired[OutputParameters]


class InferenceRequest(TypedDict):
    """``POST /v2/models/{name}[/versions/{v}]/infer`` body."""

    id: NotRequired[str]
    parameters: NotRequired[dict[str, Any]]
    inputs: list[RequestInput]
    outputs: NotRequired[list[RequestedOutput]]


class ResponseOutput(TypedDict):
    """One output tensor of an inference response: ``data`` or a binary_data_size."""

    name: str
    shape: list[int]
    datatype: str
    parameters: NotRequired[TensorParameters]
    data: NotRequired[Any]


class InferenceResponse(TypedDict):
    """The response of an inference request (the JSON header with the binary extension)."""

    model_name: str
    model_version: str
    id: str
    parameters: NotRequired[dict[str, Any]]
    outputs: list[ResponseOutput]


class MetadataTensor(TypedDict):
    """An input or output in model metadata; -1 marks a dynamic dimension."""

    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(TypedDict):
    """``GET /v2/models/{name}[/versions/{v}]`` body."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]


class ServerMetadata(TypedDict):
    """``GET /v2`` body."""

    name: str
    version: str
    extensions: list[str]


class ErrorBody(TypedDict):
    """Every error response: what is wrong and how to fix it."""

    error: str
