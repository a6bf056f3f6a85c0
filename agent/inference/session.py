"""The onnxruntime session behind a small ``ModelRunner`` protocol.

``OrtRunner`` owns one ``InferenceSession``: it builds it with the configured
providers, threads and optimisation level, reads its signature, converts BYTES
tensors to what onnxruntime wants, and runs it. It is synchronous and blocking: the
batcher runs it on an executor, except for models the warm-up measured faster than a
thread hand-off (``[batching] inline_max_us``), which it runs on the event loop.
"""

from __future__ import annotations

import locale
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from agent.errors import BadRequest, ModelLoadError
from agent.inference.signature import ModelSignature
from agent.tensors import ORT_TO_V2, Array, TensorSpec

_OPT_LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

#: ONNX leaves model_version at 0 when unset; onnxruntime reports -1 as int64 max.
_MAX_MODEL_VERSION = 2**31


class ModelRunner(Protocol):
    """Runs one model version; blocking, thread-safe for concurrent ``run`` calls."""

    signature: ModelSignature
    #: A typical run time on one synthetic row, measured at warm-up (None if not measured).
    typical_run_s: float | None

    def run(self, inputs: dict[str, Array], outputs: tuple[str, ...]) -> dict[str, Array]:
        """Run the model on named inputs and return the named outputs."""

    def close(self) -> None:
        """Release the session; later ``run`` calls raise."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionSettings:
    """How sessions are built; taken from ``[models]`` in the config."""

    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    graph_optimization: str = "all"


class OrtRunner:
    """An onnxruntime session with its signature, ready to run."""

    def __init__(self, model: Path | bytes, settings: SessionSettings) -> None:
        self._session: ort.InferenceSession | None = _create_session(model, settings)
        self.signature = _read_signature(self._session)
        self.model_version = _model_version(self._session)
        self.typical_run_s: float | None = None
        self._string_inputs = frozenset(
            s.name for s in self.signature.inputs if s.datatype == "BYTES"
        )

    def run(self, inputs: dict[str, Array], outputs: tuple[str, ...]) -> dict[str, Array]:
        session = self._session
        if session is None:
            raise RuntimeError("the session was closed while a request still held it")
        feed = inputs
        if self._string_inputs:
            feed = {
                k: _as_ort_strings(k, v) if k in self._string_inputs else v
                for k, v in inputs.items()
            }
        results = session.run(list(outputs), feed)
        return dict(zip(outputs, results, strict=True))

    def close(self) -> None:
        self._session = None


def _create_session(model: Path | bytes, settings: SessionSettings) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.intra_op_threads
    options.inter_op_num_threads = settings.inter_op_threads
    options.graph_optimization_level = _OPT_LEVELS[settings.graph_optimization]
    # Errors reach the operator through ModelLoadError; keep onnxruntime off stderr.
    options.log_severity_level = 3
    # Spinning threads burn a core while idle; on a shared edge box that is never worth it.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    source = str(model) if isinstance(model, Path) else model
    try:
        return ort.InferenceSession(
            source, sess_options=options, providers=list(settings.providers)
        )
    except Exception as exc:
        raise ModelLoadError("session", _explain_ort_error(exc)) from exc


def _explain_ort_error(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    if "locale" in text.lower():
        missing = _missing_locale(text)
        return (
            f"{text} -- the model asks for a locale this machine does not have"
            f"{' (' + missing + ')' if missing else ''}; installed: {_installed_locales()}. "
            "Rebuild the model with an installed locale (skl2onnx: options "
            '{TfidfVectorizer: {"locale": "C.UTF-8"}}) or install the locale (locale-gen).'
        )
    if "protobuf" in text.lower() or "INVALID_PROTOBUF" in text:
        return f"{text} -- the file is not a complete ONNX model (corrupt or half-copied?)"
    return text


def _missing_locale(text: str) -> str:
    for token in text.replace("'", " ").replace('"', " ").split():
        if "_" in token and "." in token and token[0].isalpha():
            return token.rstrip(".,:;")
    return ""


def _installed_locales() -> str:
    names = sorted({"C", "POSIX", *locale.locale_alias.values()} & _locale_dirs())
    return ", ".join(names) if names else "C, POSIX"


def _locale_dirs() -> set[str]:
    found = {"C", "POSIX"}
    for root in ("/usr/lib/locale", "/usr/share/i18n/locales"):
        if os.path.isdir(root):
            found.update(os.listdir(root))
    return found


def _read_signature(session: ort.InferenceSession) -> ModelSignature:
    return ModelSignature(
        inputs=tuple(_spec(arg, "input") for arg in session.get_inputs()),
        outputs=tuple(_spec(arg, "output") for arg in session.get_outputs()),
    )


def _spec(arg: Any, kind: str) -> TensorSpec:
    datatype = ORT_TO_V2.get(arg.type)
    if datatype is None:
        hint = ""
        if arg.type.startswith(("seq", "map")):
            hint = (
                '; sklearn classifiers need skl2onnx options={"zipmap": False} '
                "to output a plain probability tensor"
            )
        raise ModelLoadError(
            "signature",
            f'{kind} "{arg.name}" has type {arg.type}, which the V2 protocol cannot carry{hint}',
        )
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or []))
    return TensorSpec(name=arg.name, datatype=datatype, shape=shape)


def _model_version(session: ort.InferenceSession) -> int | None:
    version = int(session.get_modelmeta().version)
    return version if 0 < version < _MAX_MODEL_VERSION else None


def _as_ort_strings(name: str, array: Array) -> Array:
    """onnxruntime wants ``str`` elements; the wire gives us ``bytes``."""
    if array.dtype.kind == "U":
        return array.astype(object)
    flat = array.ravel()
    try:
        decoded = [x.decode() if isinstance(x, bytes) else str(x) for x in flat]
    except UnicodeDecodeError as exc:
        raise BadRequest(
            f'input "{name}": element is not valid UTF-8 ({exc.reason}); text models take UTF-8'
        ) from exc
    out = np.empty(len(decoded), dtype=object)
    out[:] = decoded
    return out.reshape(array.shape)
