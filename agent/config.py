"""Configuration: one TOML file becomes frozen dataclasses, with every problem reported at once.

Responsibility: read and validate the settings, nothing else. This module must not open
sockets, read token files, create directories or log; callers do that with the values it
returns, and nothing downstream re-checks a value that passed here.

Each section is a frozen dataclass. Its fields carry their constraints in metadata (see
``_setting``), so validation is driven by the dataclass fields and their types, plus a few
checks that span two keys (``_CROSS_CHECKS``). Problems come back as
``ConfigProblem(key, line, message)`` with messages of the form
``got X; expected Y; <how to fix it>``. tomllib gives no positions, so lines are found
in the source text (``_LineIndex``).

Relative paths: ``load()`` resolves them against the config file's directory (so a config
works wherever the agent is started from); ``loads()`` and ``default()`` resolve them
against the current working directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import socket
import tomllib
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, TypeVar, Union, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit

from agent.cores import MAX_PROCESSES, cgroup_cpu_quota, usable_cores
from agent.errors import ConfigError, ConfigProblem

T = TypeVar("T")

OnRemove = Literal["unload", "keep"]
SwapMode = Literal["availability", "memory"]
EventLoop = Literal["uvloop", "asyncio"]
GraphOptimization = Literal["disabled", "basic", "extended", "all"]
WireFormat = Literal["msgpack", "json"]
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["json", "console", "auto"]


class _Invalid(Exception):
    """A value failed a check: ``hint`` says how to fix it; ``expected`` overrides the field's."""

    def __init__(self, hint: str = "", expected: str = "") -> None:
        super().__init__(hint)
        self.hint = hint
        self.expected = expected


@dataclass(frozen=True, slots=True)
class _Rule:
    """Constraints on one setting, kept in its dataclass field's metadata."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    nonempty: bool = False
    secret: bool = False
    expected: str = ""
    check: Callable[[Any], None] | None = None


def _setting(
    default: T,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    nonempty: bool = False,
    secret: bool = False,
    expected: str = "",
    check: Callable[[Any], None] | None = None,
) -> T:
    """A dataclass field with a default and the constraints its TOML value must meet."""
    rule = _Rule(ge, gt, le, nonempty, secret, expected, check)
    return field(default=default, repr=not secret, metadata={"rule": rule})


def _check_url(value: str) -> None:
    """An upstream URL is empty (no shipping) or an absolute http(s) URL."""
    if not value:
        return
    try:
        parts = urlsplit(value)
        host = parts.hostname
    except ValueError as err:
        raise _Invalid(str(err)) from err
    if parts.scheme not in ("http", "https") or not host:
        raise _Invalid(f'did you mean "https://{value}"?' if "://" not in value else "")


def _check_tokens(value: str | tuple[str, ...]) -> None:
    """Bearer tokens are single words: no spaces, no empty entries ("" alone means unset)."""
    tokens = ((value,) if value else ()) if isinstance(value, str) else value
    for token in tokens:
        if not token or any(char.isspace() for char in token):
            raise _Invalid(
                "a bearer token is one word; remove the spaces or the empty entry",
                expected="tokens without whitespace",
            )


# --- the schema: one frozen dataclass per [section] -------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Server:
    """[server]: where and how the HTTP API listens."""

    host: str = _setting("127.0.0.1", nonempty=True)
    port: int = _setting(8080, ge=0, le=65535)
    cert_file: Path | None = None
    key_file: Path | None = None
    max_body_bytes: int = _setting(67_108_864, ge=1024)
    max_elements: int = _setting(16_777_216, ge=1)
    max_rows: int = _setting(4096, ge=1)
    drain_timeout_s: float = _setting(20.0, gt=0)
    keepalive_timeout_s: float = _setting(75.0, gt=0)
    processes: int = _setting(1, ge=0, le=MAX_PROCESSES)  # 0: one per usable core
    fast_path: bool = True  # agent/api/fastpath.py: inference requests skip aiohttp's web layer
    event_loop: EventLoop = "uvloop"  # agent/loops.py

    def serving_processes(self) -> int:
        """``processes``, with 0 resolved to the cores this process may run on: its CPU
        affinity mask, capped by its cgroup CPU quota (a container limited to 1.5 CPUs on
        a 16-core host runs 2)."""
        if self.processes:
            return self.processes
        return usable_cores(len(os.sched_getaffinity(0)), cgroup_cpu_quota())


@dataclass(frozen=True, slots=True, kw_only=True)
class Models:
    """[models]: the drop directory, the onnxruntime sessions, and the go-live pipeline."""

    dir: Path = Path("models")
    settle_ms: int = _setting(500, ge=0)
    keep_versions: int = _setting(5, ge=1)
    on_remove: OnRemove = "unload"
    rescan_s: float = _setting(30.0, gt=0)
    swap: SwapMode = "availability"
    providers: tuple[str, ...] = _setting(("CPUExecutionProvider",), nonempty=True)
    intra_op_threads: int = _setting(1, ge=0)
    inter_op_threads: int = _setting(1, ge=0)
    graph_optimization: GraphOptimization = "all"
    max_load_s: float = _setting(60.0, gt=0)
    warmup_runs: int = _setting(3, ge=0)
    probation_s: float = _setting(60.0, ge=0)
    max_error_rate: float = _setting(0.05, ge=0, le=1)
    max_p99_ratio: float = _setting(3.0, ge=1)
    min_probation_requests: int = _setting(20, ge=1)
    allow_insecure_dir: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class State:
    """[state]: the agent's own directory (model store, registry, prediction log, outbox)."""

    dir: Path = Path("state")


@dataclass(frozen=True, slots=True, kw_only=True)
class Batching:
    """[batching]: dynamic batching per model version."""

    enabled: bool = True
    max_batch_size: int = _setting(32, ge=1)
    max_delay_ms: float = _setting(2.0, ge=0)
    max_queue: int = _setting(1024, ge=1)
    workers: int = _setting(2, ge=1)
    inline_max_us: float = _setting(100.0, ge=0)


@dataclass(frozen=True, slots=True, kw_only=True)
class Drift:
    """[drift]: live sketches, windows and the thresholds that turn scores into a status."""

    enabled: bool = True
    window_s: float = _setting(300.0, gt=0)
    reference_rows: int = _setting(1000, ge=10)
    psi_warn: float = _setting(0.1, gt=0)
    psi_alert: float = _setting(0.25, gt=0)
    min_rows: int = _setting(300, ge=1)
    alert_share: float = _setting(0.0, ge=0, le=1)
    queue_size: int = _setting(1024, ge=1)
    sample_rate: float = _setting(1.0, gt=0, le=1)


@dataclass(frozen=True, slots=True, kw_only=True)
class Upstream:
    """[upstream]: where the outbox ships its batches, and how."""

    url: str = _setting(
        "", check=_check_url, expected='an http:// or https:// URL, or "" to ship nothing'
    )
    token: str = _setting("", secret=True, check=_check_tokens)
    token_file: Path | None = None
    agent_id: str = ""
    format: WireFormat = "msgpack"
    flush_interval_s: float = _setting(5.0, gt=0)
    max_backoff_s: float = _setting(300.0, gt=0)
    batch_max_records: int = _setting(500, ge=1)
    batch_max_bytes: int = _setting(1_048_576, ge=1024)
    timeout_s: float = _setting(10.0, gt=0)
    gzip: bool = True

    def agent_name(self) -> str:
        """The agent id sent upstream: ``agent_id``, else this machine's host name."""
        return self.agent_id or socket.gethostname()


@dataclass(frozen=True, slots=True, kw_only=True)
class Outbox:
    """[outbox]: the durable queue of everything bound upstream."""

    max_bytes: int = _setting(268_435_456, ge=65536)
    fsync: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class Capture:
    """[capture]: sampling of raw inputs and outputs shipped upstream."""

    rate: float = _setting(0.0, ge=0, le=1)


@dataclass(frozen=True, slots=True, kw_only=True)
class Feedback:
    """[feedback]: the prediction log that ground-truth labels are joined to."""

    ttl_s: float = _setting(604_800.0, gt=0)
    max_bytes: int = _setting(268_435_456, ge=65536)
    input_sample_rate: float = _setting(0.1, ge=0, le=1)
    window_s: float = _setting(3600.0, gt=0)


@dataclass(frozen=True, slots=True, kw_only=True)
class Auth:
    """[auth]: bearer tokens; no token of a kind (list and file both empty) = that auth off."""

    predict_tokens: tuple[str, ...] = _setting((), secret=True, check=_check_tokens)
    admin_tokens: tuple[str, ...] = _setting((), secret=True, check=_check_tokens)
    predict_token_file: Path | None = None
    admin_token_file: Path | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Log:
    """[log]: structlog output."""

    level: LogLevel = "info"
    format: LogFormat = "auto"
    access_log: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """The whole configuration; ``source`` is the file it came from (None: text or defaults)."""

    server: Server = field(default_factory=Server)
    models: Models = field(default_factory=Models)
    state: State = field(default_factory=State)
    batching: Batching = field(default_factory=Batching)
    drift: Drift = field(default_factory=Drift)
    upstream: Upstream = field(default_factory=Upstream)
    outbox: Outbox = field(default_factory=Outbox)
    capture: Capture = field(default_factory=Capture)
    feedback: Feedback = field(default_factory=Feedback)
    auth: Auth = field(default_factory=Auth)
    log: Log = field(default_factory=Log)
    source: Path | None = None


# --- checks that span two keys of one section ---------------------------------------------

_Pairs = list[tuple[str, str]]


def _tls_pair(values: Mapping[str, Any]) -> _Pairs:
    cert, key = values["cert_file"], values["key_file"]
    if (cert is None) == (key is None):
        return []
    have, missing = ("cert_file", "key_file") if key is None else ("key_file", "cert_file")
    return [
        (
            have,
            f"got {have} without {missing}; expected both or neither; "
            f"set {missing} as well to serve TLS, or remove {have} to serve plain HTTP",
        )
    ]


def _psi_order(values: Mapping[str, Any]) -> _Pairs:
    warn, alert = values["psi_warn"], values["psi_alert"]
    if warn < alert:
        return []
    return [
        (
            "psi_warn",
            f"got {warn} with psi_alert = {alert}; expected psi_warn < psi_alert; "
            "lower psi_warn or raise psi_alert",
        )
    ]


def _one_token_source(values: Mapping[str, Any]) -> _Pairs:
    if not values["token"] or values["token_file"] is None:
        return []
    return [
        (
            "token_file",
            "got both token and token_file; expected at most one; "
            "keep the secret in token_file and remove token",
        )
    ]


@dataclass(frozen=True, slots=True)
class _Cross:
    """A check over several keys of a section; skipped when one of them is already wrong."""

    section: str
    keys: tuple[str, ...]
    check: Callable[[Mapping[str, Any]], _Pairs]


_CROSS_CHECKS: Final = (
    _Cross("server", ("cert_file", "key_file"), _tls_pair),
    _Cross("drift", ("psi_warn", "psi_alert"), _psi_order),
    _Cross("upstream", ("token", "token_file"), _one_token_source),
)


# --- turning one TOML value into one field value -------------------------------------------


@dataclass(frozen=True, slots=True)
class _Spec:
    """What one field accepts: its kind (from the type hint), choices, and rule."""

    name: str
    kind: str
    rule: _Rule
    choices: tuple[str, ...] = ()


_SIMPLE_KINDS: Final = types.MappingProxyType(
    {bool: "bool", int: "int", float: "float", str: "str", Path: "path"}
)
_NOUNS: Final = types.MappingProxyType(
    {
        "bool": "true or false",
        "int": "an integer",
        "float": "a number",
        "str": "a string",
        "path": "a path string",
        "optional_path": 'a path string, or "" for none',
        "strings": "an array of strings",
    }
)
_UNITS: Final = (("_ms", "milliseconds"), ("_s", "seconds"), ("_bytes", "bytes"))


def _section_types() -> dict[str, type]:
    """Section name -> its dataclass, in the order of ``Config``'s fields."""
    hints = get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config) if f.name != "source"}


def _rule_of(f: dataclasses.Field[Any]) -> _Rule:
    rule = f.metadata.get("rule", _Rule())
    assert isinstance(rule, _Rule)
    return rule


def _specs(cls: type) -> dict[str, _Spec]:
    hints = get_type_hints(cls)
    return {f.name: _spec(f.name, hints[f.name], _rule_of(f)) for f in dataclasses.fields(cls)}


def _spec(name: str, hint: Any, rule: _Rule) -> _Spec:
    origin = get_origin(hint)
    if origin is Literal:
        return _Spec(name, "choice", rule, tuple(get_args(hint)))
    if origin is tuple:
        return _Spec(name, "strings", rule)
    if origin in (Union, types.UnionType):
        return _Spec(name, "optional_path", rule)
    return _Spec(name, _SIMPLE_KINDS[hint], rule)


def _expected(spec: _Spec) -> str:
    """The 'expected ...' text of a field: kind, emptiness, range and unit."""
    if spec.rule.expected:
        return spec.rule.expected
    if spec.kind == "choice":
        return "one of " + ", ".join(json.dumps(c) for c in spec.choices)
    noun = _NOUNS[spec.kind]
    if spec.rule.nonempty:
        noun = "a non-empty " + noun.removeprefix("an ").removeprefix("a ")
    unit = next((f" ({word})" for end, word in _UNITS if spec.name.endswith(end)), "")
    return noun + _range_text(spec.rule) + unit


def _range_text(rule: _Rule) -> str:
    if rule.ge is not None and rule.le is not None:
        return f" {rule.ge}..{rule.le}"
    bounds = [(">=", rule.ge), (">", rule.gt), ("<=", rule.le)]
    text = " and ".join(f"{op} {bound}" for op, bound in bounds if bound is not None)
    return " " + text if text else ""


def _in_range(value: float, rule: _Rule) -> bool:
    below = (rule.ge is not None and value < rule.ge) or (rule.gt is not None and value <= rule.gt)
    return not below and not (rule.le is not None and value > rule.le)


def _looks_numeric(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return isinstance(value, str)


def _number_hint(value: Any, *, whole: bool) -> str:
    if isinstance(value, bool):
        return "true/false is not a number"
    if _looks_numeric(value):
        return "remove the quotes"
    if whole and isinstance(value, float):
        return "use a whole number, without a decimal point"
    return ""


def _to_int(value: Any, spec: _Spec) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise _Invalid(_number_hint(value, whole=True))


def _to_float(value: Any, spec: _Spec) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise _Invalid(_number_hint(value, whole=False))
    if not math.isfinite(value):
        raise _Invalid("use a finite number")
    return float(value)


def _to_bool(value: Any, spec: _Spec) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in {"true", "false", "yes", "no"}:
        raise _Invalid("write true or false, without quotes")
    raise _Invalid("write true or false" if isinstance(value, int | float) else "")


def _to_str(value: Any, spec: _Spec) -> str:
    if isinstance(value, str):
        return value
    raise _Invalid("put the value in double quotes")


def _to_path(value: Any, spec: _Spec) -> Path:
    path = _to_optional_path(value, spec)
    if path is None:
        raise _Invalid("give a file or directory path")
    return path


def _to_optional_path(value: Any, spec: _Spec) -> Path | None:
    text = _to_str(value, spec)
    if not text:
        return None
    try:
        return Path(text).expanduser()
    except RuntimeError as err:  # "~user" of an unknown user
        raise _Invalid("the home directory is unknown; give an absolute path") from err


def _to_strings(value: Any, spec: _Spec) -> tuple[str, ...]:
    if isinstance(value, str):
        example = '"..."' if spec.rule.secret else json.dumps(value)
        raise _Invalid(f"wrap it in brackets: [{example}]")
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise _Invalid('write it as ["a", "b"]')
    return tuple(value)


def _to_choice(value: Any, spec: _Spec) -> str:
    if isinstance(value, str) and value in spec.choices:
        return value
    if not isinstance(value, str):
        raise _Invalid()
    close = difflib.get_close_matches(value.lower(), spec.choices, n=1)
    raise _Invalid(f'did you mean "{close[0]}"?' if close else "")


_CONVERTERS: Final[Mapping[str, Callable[[Any, _Spec], Any]]] = types.MappingProxyType(
    {
        "bool": _to_bool,
        "int": _to_int,
        "float": _to_float,
        "str": _to_str,
        "path": _to_path,
        "optional_path": _to_optional_path,
        "strings": _to_strings,
        "choice": _to_choice,
    }
)


def _convert(spec: _Spec, raw: Any, base: Path) -> Any:
    """The field value for ``raw``, or ``_Invalid``; relative paths are joined to ``base``."""
    value = _CONVERTERS[spec.kind](raw, spec)
    if isinstance(value, int | float) and not _in_range(value, spec.rule):
        raise _Invalid()
    if spec.rule.nonempty and not value:
        raise _Invalid()
    if spec.rule.check is not None:
        spec.rule.check(value)
    return base / value if isinstance(value, Path) else value


# --- showing values in messages and in describe() -----------------------------------------


def _redact_url(text: str) -> str:
    """``text`` with the password of a URL's user info replaced by ``***``."""
    try:
        parts = urlsplit(text)
        password = parts.password
    except ValueError:
        return text
    if not password:
        return text
    netloc = parts.netloc.replace(f":{password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def _kind_of(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "a table"


def _show(value: Any, *, secret: bool = False) -> str:
    """A TOML-like rendering of a value for a message (secrets show only their kind)."""
    if secret or isinstance(value, dict):
        return _kind_of(value)
    if isinstance(value, list) and any(isinstance(item, dict) for item in value):
        return "an array of tables"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = json.dumps(_redact_url(value), ensure_ascii=False)
    elif isinstance(value, list):
        text = "[" + ", ".join(_show(item) for item in value) + "]"
    else:
        text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _message(spec: _Spec, raw: Any, bad: _Invalid) -> str:
    expected = bad.expected or _expected(spec)
    text = f"got {_show(raw, secret=spec.rule.secret)}; expected {expected}"
    return f"{text}; {bad.hint}" if bad.hint else text


def _unknown(name: str, known: Sequence[str], what: str, template: str) -> str:
    """'unknown <what>' plus the closest known name, or the list of valid ones."""
    close = difflib.get_close_matches(name, known, n=1)
    if close:
        return f"unknown {what}; did you mean {template.format(close[0])}?"
    return f"unknown {what}; expected one of: " + ", ".join(template.format(k) for k in known)


# --- line numbers: tomllib gives none, so find keys in the source text --------------------

_SEGMENT = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|'[^']*')"""
_KEY_PATH = rf"{_SEGMENT}(?:\s*\.\s*{_SEGMENT})*"
_SEGMENT_RE: Final = re.compile(_SEGMENT)
_HEADER_RE: Final = re.compile(rf"^\s*\[\[?\s*({_KEY_PATH})\s*\]")
_ASSIGN_RE: Final = re.compile(rf"^\s*({_KEY_PATH})\s*=")
_AT_RE: Final = re.compile(r"\s*\(at line (\d+), column (\d+)\)")


def _key_path(text: str) -> tuple[str, ...]:
    segments = (match.group(0) for match in _SEGMENT_RE.finditer(text))
    return tuple(s[1:-1] if s[0] in "\"'" else s for s in segments)


def _opens_or_closes_multiline(line: str) -> bool:
    return (line.count('"""') + line.count("'''")) % 2 == 1


class _LineIndex:
    """The first line of every table header and key assignment, by dotted key path."""

    def __init__(self, text: str) -> None:
        self._lines: dict[tuple[str, ...], int] = {}
        table: tuple[str, ...] = ()
        in_multiline = False
        for number, line in enumerate(text.splitlines(), start=1):
            inside = in_multiline
            in_multiline ^= _opens_or_closes_multiline(line)
            if inside:
                continue  # a line of a multi-line string is not a key
            if header := _HEADER_RE.match(line):
                table = _key_path(header.group(1))
                self._lines.setdefault(table, number)
            elif assign := _ASSIGN_RE.match(line):
                self._lines.setdefault(table + _key_path(assign.group(1)), number)

    def line_of(self, path: tuple[str, ...]) -> int:
        """The line of ``path``, else of its nearest enclosing table; 0 if none is written."""
        for end in range(len(path), 0, -1):
            if line := self._lines.get(path[:end]):
                return line
        return 0


class _Problems:
    """Collects the problems of one file, each with its key and line."""

    def __init__(self, index: _LineIndex) -> None:
        self.index = index
        self.items: list[ConfigProblem] = []

    def add(self, path: tuple[str, ...], message: str) -> None:
        self.items.append(ConfigProblem(".".join(path), self.index.line_of(path), message))

    def in_order(self) -> list[ConfigProblem]:
        return sorted(self.items, key=lambda p: (p.line == 0, p.line, p.key))


# --- reading a document ---------------------------------------------------------------------


def _read_section(
    name: str, cls: type, table: Mapping[str, Any], base: Path, problems: _Problems
) -> Any:
    """The section's dataclass built from ``table``, or None when it has problems."""
    specs = _specs(cls)
    values: dict[str, Any] = {}
    failed: set[str] = set()
    for key, raw in table.items():
        spec = specs.get(key)
        if spec is None:
            failed.add(key)
            problems.add((name, key), _unknown(key, list(specs), "key", '"{}"'))
            continue
        try:
            values[key] = _convert(spec, raw, base)
        except _Invalid as bad:
            failed.add(key)
            problems.add((name, key), _message(spec, raw, bad))
    _resolve_default_paths(cls, values, base)
    failed |= _cross_check(name, cls, values, failed, problems)
    return None if failed else cls(**values)


def _resolve_default_paths(cls: type, values: dict[str, Any], base: Path) -> None:
    """Join default relative paths to ``base``, as the file's own paths are."""
    for f in dataclasses.fields(cls):
        if f.name not in values and isinstance(f.default, Path):
            values[f.name] = base / f.default


def _cross_check(
    name: str, cls: type, values: dict[str, Any], failed: set[str], problems: _Problems
) -> set[str]:
    """Run the section's multi-key checks on valid values; return the keys that failed."""
    defaults = cls()
    merged = {
        f.name: values.get(f.name, getattr(defaults, f.name)) for f in dataclasses.fields(cls)
    }
    flagged: set[str] = set()
    for cross in _CROSS_CHECKS:
        if cross.section != name or failed.intersection(cross.keys):
            continue
        for key, message in cross.check(merged):
            flagged.add(key)
            problems.add((name, key), message)
    return flagged


def _top_level_problem(name: str, raw: Any, sections: Mapping[str, type]) -> str:
    if not isinstance(raw, dict):
        owners = [s for s, cls in sections.items() if name in _specs(cls)]
        if owners:
            return f"unknown key at the top level; did you mean to put it under [{owners[0]}]?"
    return _unknown(name, list(sections), "section", "[{}]")


def _build(
    doc: Mapping[str, Any], base: Path, index: _LineIndex
) -> tuple[dict[str, Any], _Problems]:
    """Every section's dataclass from a parsed document, and the problems found on the way."""
    problems = _Problems(index)
    sections = _section_types()
    built: dict[str, Any] = {}
    for name, raw in doc.items():
        cls = sections.get(name)
        if cls is None:
            problems.add((name,), _top_level_problem(name, raw, sections))
        elif not isinstance(raw, dict):
            problems.add(
                (name,),
                f"got {_show(raw)}; expected a table; "
                f"write [{name}] on its own line and its keys below it",
            )
        else:
            built[name] = _read_section(name, cls, raw, base, problems)
    for name, cls in sections.items():
        if name not in built:
            built[name] = _read_section(name, cls, {}, base, problems)
    return built, problems


def _syntax_problem(err: tomllib.TOMLDecodeError, text: str) -> ConfigProblem:
    message = str(err)
    at = _AT_RE.search(message)
    if at is None:  # "(at end of document)"
        line = max(1, len(text.splitlines()))
        detail = message.replace(" (at end of document)", "") + " at the end of the file"
    else:
        line = int(at.group(1))
        detail = _AT_RE.sub("", message) + f" at column {at.group(2)}"
    return ConfigProblem(
        "toml", line, f"invalid TOML: {detail}; fix the syntax (see https://toml.io)"
    )


def _parse(text: str, source: str, base: Path, path: Path | None) -> Config:
    try:
        doc = tomllib.loads(text.removeprefix("\ufeff"))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(source, [_syntax_problem(err, text)]) from err
    built, problems = _build(doc, base, _LineIndex(text))
    if problems.items:
        raise ConfigError(source, problems.in_order())
    return Config(**built, source=path)


# --- public API -------------------------------------------------------------------------------


def load(path: Path) -> Config:
    """Read and validate a config file; relative paths in it are relative to its directory.

    Raises:
        ConfigError: with every problem found (or the one reason the file cannot be read).
    """
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as err:
        reason = err.strerror or str(err)
        problem = ConfigProblem(
            "file", 0, f"cannot read it: {reason}; check the path and its permissions"
        )
        raise ConfigError(str(path), [problem]) from err
    except UnicodeDecodeError as err:
        problem = ConfigProblem(
            "file", 0, f"got a byte that is not UTF-8 at offset {err.start}; save it as UTF-8"
        )
        raise ConfigError(str(path), [problem]) from err
    absolute = path.absolute()
    return _parse(text, str(path), absolute.parent, absolute)


def loads(text: str, source: str = "<string>") -> Config:
    """Validate config text; relative paths are relative to the current working directory.

    Raises:
        ConfigError: with every problem found; ``source`` names the text in its message.
    """
    return _parse(text, source, Path.cwd(), None)


def default() -> Config:
    """Every setting at its default, paths resolved against the current working directory."""
    return loads("", "<defaults>")


def _public(value: Any, *, secret: bool) -> Any:
    """A JSON-able form of a field value; secrets become "***" (empty ones stay empty)."""
    if isinstance(value, tuple):
        return ["***" if secret else item for item in value]
    if secret:
        return "***" if value else ""
    if isinstance(value, Path):
        return str(value)
    return _redact_url(value) if isinstance(value, str) else value


def describe(config: Config) -> dict[str, Any]:
    """Every setting as a JSON-able dict, safe for logs and the status API (no secrets)."""
    out: dict[str, Any] = {}
    for name in _section_types():
        section = getattr(config, name)
        out[name] = {
            f.name: _public(getattr(section, f.name), secret=_rule_of(f).secret)
            for f in dataclasses.fields(section)
        }
    out["source"] = None if config.source is None else str(config.source)
    return out


def diff(old: Config, new: Config) -> list[str]:
    """The dotted keys (``section.key``) whose values differ between two configs."""
    changed: list[str] = []
    for name in _section_types():
        before, after = getattr(old, name), getattr(new, name)
        changed.extend(
            f"{name}.{f.name}"
            for f in dataclasses.fields(before)
            if getattr(before, f.name) != getattr(after, f.name)
        )
    return changed
