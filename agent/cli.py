"""The ``edge-agent`` command line: run, check-config, deploy, rollback, status.

This is the only module that prints. Commands that talk to a running agent use its
HTTP API (``--url``, ``--token``), so they work the same on the box and remotely.
Exit codes: 0 ok, 1 the operation failed, 2 bad usage or config.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, get_args

from agent import __version__, loops
from agent import config as config_module
from agent.config import EventLoop
from agent.errors import AgentError, ConfigError
from agent.models.manifest import load as load_manifest

_DEFAULT_URL = "http://127.0.0.1:8080"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``edge-agent`` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(exc.message, file=sys.stderr)
        return 2
    except AgentError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-agent", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the agent (foreground; systemd runs this)")
    run.add_argument("--config", type=Path, help="config file (default: built-in defaults)")
    run.set_defaults(func=_cmd_run)

    check = sub.add_parser("check-config", help="report every problem in a config file")
    check.add_argument("path", type=Path)
    check.set_defaults(func=_cmd_check_config)

    deploy = sub.add_parser("deploy", help="copy a model into the drop directory safely")
    deploy.add_argument("file", type=Path, help="the .onnx file")
    deploy.add_argument("--name", required=True, help="model name")
    deploy.add_argument("--version", type=int, help="version (versioned layout <name>/<v>/)")
    deploy.add_argument("--manifest", type=Path, help="manifest TOML to deploy with it")
    where = deploy.add_mutually_exclusive_group()
    where.add_argument("--dir", type=Path, help="drop directory (default: from --config)")
    where.add_argument("--config", type=Path, help="config whose [models] dir to use")
    deploy.set_defaults(func=_cmd_deploy)

    rollback = sub.add_parser("rollback", help="activate an earlier version of a model")
    rollback.add_argument("name")
    rollback.add_argument("--to", type=int, help="version (default: the previous one)")
    _client_args(rollback)
    rollback.set_defaults(func=_cmd_rollback)

    baseline = sub.add_parser(
        "baseline", help="profile training data (and the model's outputs on it) for drift"
    )
    baseline.add_argument("--model", type=Path, required=True, help="the .onnx file")
    baseline.add_argument("--data", type=Path, required=True, help="npy, npz or csv (header)")
    baseline.add_argument("-o", "--out", type=Path, required=True, help="baseline.msgpack")
    baseline.add_argument("--features", help="comma-separated feature names of the input")
    baseline.add_argument("--manifest", type=Path, help="manifest with [inputs] feature names")
    baseline.add_argument("--name", help="the model's name in the agent (default: inferred)")
    baseline.set_defaults(func=_cmd_baseline)

    # Spawned by `run` when [server] processes > 1; not for people (hence no help).
    replica = sub.add_parser("replica")
    replica.add_argument("--channel-fd", type=int, required=True)
    replica.add_argument("--event-loop", choices=get_args(EventLoop), required=True)
    replica.set_defaults(func=_cmd_replica)

    status = sub.add_parser("status", help="models, versions, states of a running agent")
    status.add_argument("--json", action="store_true", help="print the raw JSON")
    _client_args(status)
    status.set_defaults(func=_cmd_status)
    return parser


def _client_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        default=os.environ.get("EDGE_AGENT_URL", _DEFAULT_URL),
        help=f"agent URL (default $EDGE_AGENT_URL or {_DEFAULT_URL})",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("EDGE_AGENT_TOKEN"),
        help="admin bearer token (default $EDGE_AGENT_TOKEN)",
    )


# -- run / check-config ------------------------------------------------------------------


def _cmd_run(args: argparse.Namespace) -> int:
    from agent import daemon  # imported here: keeps `edge-agent status` light to start

    config = config_module.load(args.config) if args.config else config_module.default()
    return daemon.run(config, args.config)


def _cmd_replica(args: argparse.Namespace) -> int:
    from agent import replica

    return replica.run(args.channel_fd, args.event_loop)


def _cmd_check_config(args: argparse.Namespace) -> int:
    config = config_module.load(args.path)
    problems = loops.problems(config)
    if problems:
        raise ConfigError(str(args.path), problems)
    print(f"{args.path}: ok")
    return 0


# -- deploy ------------------------------------------------------------------------------


def _cmd_deploy(args: argparse.Namespace) -> int:
    if args.dir is not None:
        root = args.dir
    elif args.config is not None:
        root = config_module.load(args.config).models.dir
    else:
        root = config_module.default().models.dir
    if not args.file.is_file():
        print(f"error: {args.file} is not a file", file=sys.stderr)
        return 1
    if args.version is not None and args.version < 1:
        print("error: --version must be a positive integer", file=sys.stderr)
        return 2
    target = deploy_files(args.file, root, args.name, args.version, args.manifest)
    print(f"deployed {args.file} as {target}")
    return 0


def deploy_files(
    model: Path, root: Path, name: str, version: int | None, manifest: Path | None
) -> Path:
    """Write the model (and manifest with its files) into the drop dir, model last.

    Every file is first staged as a hidden temp file in its target folder (fsynced), and
    only then renamed into place, the model last: the watcher never sees a manifest whose
    model is still being copied. Without ``--manifest``, a manifest left from an earlier
    deploy at the same place is removed, so it cannot describe the new bytes.
    """
    if version is not None:
        folder = root / name / str(version)
        model_target, manifest_target = folder / "model.onnx", folder / "manifest.toml"
    else:
        folder = root
        model_target, manifest_target = root / f"{name}.onnx", root / f"{name}.toml"
    folder.mkdir(parents=True, exist_ok=True)
    plan: list[tuple[Path, Path]] = []
    if manifest is not None:
        for rel in load_manifest(manifest).referenced_files():
            target = folder / rel
            if not target.resolve().is_relative_to(folder.resolve()):
                raise AgentError(
                    f"{manifest} refers to {rel}, outside its folder; put the file next to "
                    "the manifest and use a relative path"
                )
            plan.append((manifest.parent / rel, target))
        plan.append((manifest, manifest_target))
    plan.append((model, model_target))
    staged: list[tuple[Path, Path]] = []
    try:
        for src, target in plan:
            # One at a time: what was staged is known if a later copy fails.
            staged.append((_stage(src, target), target))
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    if manifest is None:
        manifest_target.unlink(missing_ok=True)
    for tmp, target in staged:  # the model is last: its rename is what the watcher acts on
        os.replace(tmp, target)
    _fsync_dir(folder)
    return model_target


def _stage(src: Path, dest: Path) -> Path:
    """Copy ``src`` to a hidden temp file beside ``dest`` and fsync it; returns the temp."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    with src.open("rb") as fin, tmp.open("wb") as fout:
        # The agent reads the drop dir through the deploy group (see systemd/): g+r.
        os.fchmod(fout.fileno(), 0o640)
        shutil.copyfileobj(fin, fout, 1 << 20)
        fout.flush()
        os.fsync(fout.fileno())
    return tmp


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- baseline ----------------------------------------------------------------------------


def _cmd_baseline(args: argparse.Namespace) -> int:
    from agent.drift.baseline import build_baseline  # imported here: numpy work, on demand

    features = [f.strip() for f in args.features.split(",")] if args.features else None
    summary = build_baseline(
        args.model,
        args.data,
        features=features,
        manifest=args.manifest,
        out=args.out,
        name=args.name,
    )
    print(
        f"wrote {summary['out']}: model {summary['model']}, {summary['rows']} rows, "
        f"{summary['features']} input features, {summary['outputs']} output features, "
        f"{summary['bytes']} bytes; point the manifest at it: [drift] baseline = "
        f'"{Path(summary["out"]).name}"'
    )
    return 0


# -- commands that talk to a running agent -----------------------------------------------


def _call(args: argparse.Namespace, method: str, path: str, body: object = None) -> Any:
    if not args.url.startswith(("http://", "https://")):
        raise AgentError(f"--url must start with http:// or https://, got {args.url!r}")
    data = json.dumps(body).encode() if body is not None else None
    url = args.url.rstrip("/") + path  # scheme checked above: http(s) only
    request = urllib.request.Request(url, data=data, method=method)  # noqa: S310
    request.add_header("Content-Type", "application/json")
    if args.token:
        request.add_header("Authorization", f"Bearer {args.token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 -- operator's URL, checked
            return json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        with contextlib.suppress(ValueError, AttributeError):
            detail = json.loads(detail).get("error", detail)
        raise AgentError(f"{method} {path}: HTTP {exc.code}: {detail}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise AgentError(
            f"cannot reach the agent at {args.url} ({exc}); is it running? (--url)"
        ) from exc


def _cmd_rollback(args: argparse.Namespace) -> int:
    body = {"version": args.to} if args.to is not None else {}
    result = _call(args, "POST", f"/v1/models/{args.name}/rollback", body)
    print(f"{result['model']}: version {result['active_version']} is active")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    doc = _call(args, "GET", "/v1/models")
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    rows = [_status_row(m) for m in doc.get("models", [])]
    header = (
        "MODEL",
        "ACTIVE",
        "VERSIONS",
        "STATE",
        "PROBATION",
        "DRIFT",
        "ACCURACY",
        "REQUESTS",
        "LAST ERROR",
    )
    print(_table([header, *rows]))
    up = doc.get("upstream")
    if up:
        print(
            f"\noutbox: {up['outbox_records']} records, {up['outbox_bytes']} of "
            f"{up['outbox_max_bytes']} bytes, oldest {up['oldest_age_s']} s; "
            f"sent {up['sent_records']}; dead letters {up['dead_letter_records']}; "
            f"dropped {up['dropped'] or 'none'}"
            + ("" if up["url_set"] else " (no [upstream] url: collecting only)")
            + (f"; last error: {up['last_error']}" if up.get("last_error") else "")
        )
    if doc.get("drop_dir", {}).get("error"):
        print(f"\ndrop dir refused: {doc['drop_dir']['error']}")
    return 0


def _status_row(m: dict[str, Any]) -> tuple[str, ...]:
    probation = m.get("probation_remaining_s")
    drift_status = (m.get("drift") or {}).get("status") or "-"
    return (
        m["name"],
        str(m.get("active_version") or "-"),
        ",".join(str(v["version"]) for v in m.get("versions", [])) or "-",
        m.get("state", "?"),
        f"{probation:.0f}s left" if probation is not None else "-",
        str(drift_status),
        _accuracy(m),
        f"{m.get('requests', 0)} ({m.get('errors', 0)} err)",
        (m.get("last_error") or "-")[:60],
    )


def _accuracy(m: dict[str, Any]) -> str:
    active = str(m.get("active_version"))
    total = (m.get("quality") or {}).get(active, {}).get("total", {})
    if "accuracy" in total:
        return f"{total['accuracy']:.1%} of {total['labelled']}"
    if "mae" in total:
        return f"MAE {total['mae']:.3g}"
    return "-"


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )
