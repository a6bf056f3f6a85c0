"""Profile training data through a model into a baseline file (``edge-agent baseline``).

``build_baseline`` reads reference data (``.npy``: the model's one input; ``.npz``: one array
per input name; ``.csv`` with a header: the one 2-D input, the header naming its features),
runs the model on it in-process with onnxruntime, in chunks, profiles the inputs and outputs
with the kinds the live monitor uses, checks the result the way the monitor will, and writes
it atomically. It must not print or log (``cli.py`` prints the summary): every problem is a
``BaselineError`` that says what is wrong and how to fix it.
"""

from __future__ import annotations

import contextlib
import csv
import os
import tomllib
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
import onnxruntime as ort

from agent.drift.features import Kind, spec_kind
from agent.drift.profile import BaselineError, build_profile, check_compatible, expected_width
from agent.tensors import ORT_TO_V2, V2_TO_NUMPY, Array, TensorSpec

#: Rows per onnxruntime call: large enough to amortise the call, small enough for memory.
_CHUNK_ROWS: Final = 4096


def build_baseline(
    model: Path,
    data: Path,
    *,
    features: list[str] | None,
    manifest: Path | None,
    out: Path,
    name: str | None = None,
) -> dict[str, Any]:
    """Profile ``data`` and the model's outputs on it into the baseline file ``out``.

    Args:
        features: feature names of the model's one input (``--features``); else the csv
            header, else the manifest's ``[inputs]``, else f0, f1, ...
        name: the model's name in the agent; else the manifest's ``[model] name``, else the
            folder of a versioned layout (``NAME/1/model.onnx``), else the file's stem.

    Returns:
        A summary: model, rows, features (input features), outputs (output features), bytes,
        out.
    """
    session = _session(model)
    inputs, outputs = _specs(session, model)
    title, manifest_names = _read_manifest(manifest)
    arrays, header = _read_data(data, inputs)
    arrays = _fit(arrays, inputs, data)
    names = _names(inputs, features, header, manifest_names)
    model_name = name or title or _name_of(model)
    results = _run(session, arrays, outputs, inputs)
    kinds: dict[str, Kind] = {s.name: spec_kind(s, output=False) for s in inputs}
    kinds.update({s.name: spec_kind(s, output=True) for s in outputs})
    profile = build_profile(model_name, arrays, results, kinds=kinds, names=names)
    check_compatible(profile, model=model_name, inputs=inputs, outputs=outputs, names=names)
    artifact = profile.dumps()
    _write_atomically(out, artifact)
    return {
        "model": model_name,
        "rows": profile.rows,
        "features": sum(len(t.names()) for t in profile.inputs),
        "outputs": sum(len(t.names()) for t in profile.outputs),
        "bytes": len(artifact),
        "out": str(out),
    }


def _session(model: Path) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise BaselineError(
            f"cannot load the model {model}: {exc}; give the ONNX file the agent serves"
        ) from exc


def _specs(
    session: ort.InferenceSession, model: Path
) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Declared inputs and the tensor outputs (sequence or map outputs are not profiled)."""

    def spec(arg: Any) -> TensorSpec | None:
        datatype = ORT_TO_V2.get(arg.type)
        if datatype is None:
            return None
        shape = tuple(d if isinstance(d, int) and d > 0 else -1 for d in arg.shape)
        return TensorSpec(arg.name, datatype, shape)

    inputs = [spec(a) for a in session.get_inputs()]
    unsupported = [a.name for a, s in zip(session.get_inputs(), inputs, strict=True) if s is None]
    if unsupported:
        raise BaselineError(
            f"the model {model} has inputs that are not tensors ({', '.join(unsupported)}); "
            "only tensor inputs can be profiled"
        )
    outputs = [s for s in (spec(a) for a in session.get_outputs()) if s is not None]
    return tuple(s for s in inputs if s is not None), tuple(outputs)


def _read_manifest(manifest: Path | None) -> tuple[str | None, dict[str, tuple[str, ...]]]:
    """The manifest's model name and ``[inputs]`` feature names."""
    if manifest is None:
        return None, {}
    try:
        document = tomllib.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise BaselineError(
            f"cannot read the manifest {manifest}: {exc}; give the model's manifest.toml"
        ) from exc
    title = document.get("model", {}).get("name")
    inputs = document.get("inputs", {})
    if not isinstance(inputs, dict) or not all(isinstance(v, list) for v in inputs.values()):
        raise BaselineError(
            f"{manifest}: [inputs] must map each input name to a list of feature names"
        )
    names = {str(k): tuple(str(n) for n in v) for k, v in inputs.items()}
    return (str(title) if title else None), names


# --- reading the data --------------------------------------------------------------------


def _read_data(
    path: Path, inputs: Sequence[TensorSpec]
) -> tuple[dict[str, Array], list[str] | None]:
    """Arrays per input name, and the csv header when there is one."""
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _read_npz(path, inputs), None
    if suffix not in (".npy", ".csv"):
        raise BaselineError(
            f"{path}: unknown data format {suffix or '(no suffix)'!r}; give .npy (one input), "
            ".npz (one array per input name) or .csv (a header, then one row per example)"
        )
    if len(inputs) != 1:
        raise BaselineError(
            f"{path}: the model has {len(inputs)} inputs ({_listed(inputs)}); a {suffix} file "
            "holds one, so give an .npz with one array per input name"
        )
    if suffix == ".npy":
        return {inputs[0].name: _read_npy(path)}, None
    table, header = _read_csv(path, inputs[0])
    return {inputs[0].name: table}, header


def _read_npy(path: Path) -> Array:
    try:
        return np.asarray(np.load(path, allow_pickle=False))
    except (OSError, ValueError, EOFError) as exc:
        raise BaselineError(f"cannot read {path} as .npy: {exc}; {_NPY_HINT}") from exc


_NPY_HINT: Final = (
    "save it with numpy.save (texts as a str array, np.array(texts, dtype=str), not objects)"
)


def _read_npz(path: Path, inputs: Sequence[TensorSpec]) -> dict[str, Array]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [s.name for s in inputs if s.name not in archive.files]
            if missing:
                raise BaselineError(
                    f"{path} has arrays {', '.join(archive.files) or 'none'} but no array for "
                    f"input {', '.join(missing)}; name one array after each input "
                    f"({_listed(inputs)})"
                )
            return {s.name: np.asarray(archive[s.name]) for s in inputs}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise BaselineError(f"cannot read {path} as .npz: {exc}; {_NPY_HINT}") from exc


def _read_csv(path: Path, spec: TensorSpec) -> tuple[Array, list[str]]:
    if len(spec.shape) != 2 or spec.datatype == "BYTES":
        raise BaselineError(
            f'{path}: a csv file holds one numeric table, but input "{spec.name}" is '
            f"{spec.datatype} {spec.describe_shape()}; save the data as .npy instead"
        )
    try:
        with path.open(newline="", encoding="utf-8") as file:
            reader = csv.reader(file)
            header = [column.strip() for column in next(reader, [])]
            rows = [_csv_row(path, line, row, header) for line, row in enumerate(reader, 2) if row]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise BaselineError(f"cannot read {path} as csv: {exc}") from exc
    if not header or not rows:
        raise BaselineError(
            f"{path} has no {'header' if not header else 'rows'}; expected a header line "
            "naming the columns, then one line of numbers per example"
        )
    if len(set(header)) != len(header):
        doubled = sorted({c for c in header if header.count(c) > 1})
        raise BaselineError(f"{path}: the header names {', '.join(doubled)} twice; name each once")
    return _numbers(path, np.array(rows, dtype=str), header), header


def _csv_row(path: Path, line: int, row: list[str], header: list[str]) -> list[str]:
    if len(row) != len(header):
        raise BaselineError(
            f"{path} line {line}: {len(row)} values, but the header names {len(header)} "
            "columns; give every line one value per column"
        )
    return row


def _numbers(path: Path, table: Array, header: list[str]) -> Array:
    """The csv table as float64; empty cells are missing values (NaN)."""
    table = np.char.strip(table)
    table[table == ""] = "nan"
    try:
        return table.astype(np.float64)
    except ValueError:
        for (row, column), cell in np.ndenumerate(table):
            try:
                float(cell)
            except ValueError:
                raise BaselineError(
                    f'{path} line {row + 2}, column "{header[column]}": {str(cell)!r} is not a '
                    "number; leave a missing value empty"
                ) from None
        raise


# --- fitting the data to the model ----------------------------------------------------------


def _fit(arrays: Mapping[str, Array], inputs: Sequence[TensorSpec], data: Path) -> dict[str, Array]:
    """The arrays in the model's dtypes, after checking their shapes and row counts."""
    fitted = {spec.name: _fit_one(arrays[spec.name], spec, data) for spec in inputs}
    rows = {name: int(array.shape[0]) for name, array in fitted.items()}
    if len(set(rows.values())) > 1:
        raise BaselineError(
            f"{data}: the inputs have different numbers of rows ({rows}); give every input "
            "the same examples"
        )
    if not next(iter(rows.values()), 0):
        raise BaselineError(f"{data} has no rows; give at least a few hundred examples")
    return fitted


def _fit_one(array: Array, spec: TensorSpec, data: Path) -> Array:
    shape = tuple(int(d) for d in array.shape)
    fits = len(shape) == len(spec.shape) and all(
        want in (-1, got) for want, got in zip(spec.shape[1:], shape[1:], strict=True)
    )
    if not fits:
        width = expected_width(spec_kind(spec, output=False), spec.shape)
        hint = f"give {width} columns per row" if width and len(spec.shape) == 2 else "reshape it"
        raise BaselineError(
            f'{data}: the data for input "{spec.name}" has shape {list(shape)}, the model '
            f"takes {spec.describe_shape()} (-1: any size); {hint}"
        )
    textual = array.dtype.kind in ("U", "S", "O")
    if (spec.datatype == "BYTES") != textual:
        raise BaselineError(
            f'{data}: input "{spec.name}" takes {spec.datatype}, the data is {array.dtype}; '
            + ("give texts as a str array" if spec.datatype == "BYTES" else "give numbers")
        )
    if textual:
        # onnxruntime takes str elements; bytes would turn into "b'...'" strings.
        return np.array([_text(v) for v in array.reshape(-1).tolist()], dtype=object).reshape(shape)
    target = V2_TO_NUMPY[spec.datatype]
    if not np.can_cast(array.dtype, target, casting="same_kind"):
        raise BaselineError(
            f'{data}: input "{spec.name}" takes {spec.datatype}, the data is {array.dtype}; '
            f"convert it (numpy: array.astype({target.name}))"
        )
    return array.astype(target, copy=False)


def _text(value: object) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _names(
    inputs: Sequence[TensorSpec],
    features: list[str] | None,
    header: list[str] | None,
    manifest: Mapping[str, tuple[str, ...]],
) -> dict[str, tuple[str, ...]]:
    """Feature names per input: --features, the csv header, the manifest; checked."""
    names = {k: v for k, v in manifest.items() if k in {s.name for s in inputs}}
    given = features if features is not None else header
    if given is None:
        for spec in inputs:
            _check_width(spec, names.get(spec.name), "the manifest's [inputs]")
        return names
    source = "--features" if features is not None else "the csv header"
    if len(inputs) != 1:
        raise BaselineError(
            f"{source} names the features of one input, but the model has {len(inputs)} "
            f"({_listed(inputs)}); name them per input in the manifest's [inputs]"
        )
    spec = inputs[0]
    _check_width(spec, tuple(given), source)
    declared = manifest.get(spec.name)
    if declared is not None and tuple(declared) != tuple(given):
        raise BaselineError(
            f"{source} names the features {list(given)}, the manifest's [inputs] "
            f"{list(declared)}; make them agree (the agent refuses a baseline whose names "
            "differ from the manifest)"
        )
    names[spec.name] = tuple(given)
    return names


def _check_width(spec: TensorSpec, names: Sequence[str] | None, source: str) -> None:
    if names is None:
        return
    kind = spec_kind(spec, output=False)
    width = expected_width(kind, spec.shape)
    if kind != "tabular" or width is None or width != len(names):
        columns = f"{width} columns" if kind == "tabular" else f"a {kind} input"
        raise BaselineError(
            f'{source} gives {len(names)} feature names for input "{spec.name}", which has '
            f"{columns} ({spec.datatype} {spec.describe_shape()}); give one name per column"
        )


# --- running the model and writing the file -------------------------------------------------


def _run(
    session: ort.InferenceSession,
    arrays: Mapping[str, Array],
    outputs: Sequence[TensorSpec],
    inputs: Sequence[TensorSpec],
) -> dict[str, Array]:
    """The model's tensor outputs on every row, computed in chunks."""
    rows = int(next(iter(arrays.values())).shape[0])
    fixed = {s.shape[0] for s in inputs if s.shape and s.shape[0] > 0}
    chunk = fixed.pop() if len(fixed) == 1 else _CHUNK_ROWS
    if rows % chunk and fixed:
        raise BaselineError(
            f"the model takes batches of exactly {chunk} rows, the data has {rows}; give a "
            f"multiple of {chunk} rows"
        )
    names = [s.name for s in outputs]
    parts: list[list[Array]] = [[] for _ in names]
    for start in range(0, rows, chunk):
        feed = {name: array[start : start + chunk] for name, array in arrays.items()}
        try:
            results = session.run(names, feed)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise BaselineError(
                f"the model failed on rows {start} to {start + chunk - 1} of the data: {exc}; "
                "check that the data is what the model was trained on"
            ) from exc
        for part, result in zip(parts, results, strict=True):
            part.append(np.asarray(result))
    return {name: np.concatenate(part) for name, part in zip(names, parts, strict=True)}


def _write_atomically(out: Path, data: bytes) -> None:
    """Write ``out`` through a temp file in its folder, fsync, rename: never half a file."""
    temp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with temp.open("wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        temp.replace(out)
        folder = os.open(out.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise BaselineError(
            f"cannot write the baseline {out}: {exc.strerror or exc}; check that the folder "
            "exists and is writable"
        ) from exc


def _name_of(model: Path) -> str:
    """NAME for NAME/<version>/model.onnx, else the file's stem."""
    parent = model.resolve().parent
    if model.stem == "model" and parent.name.isdigit() and parent.parent.name:
        return parent.parent.name
    return model.stem


def _listed(specs: Sequence[TensorSpec]) -> str:
    return ", ".join(f'"{s.name}"' for s in specs)
