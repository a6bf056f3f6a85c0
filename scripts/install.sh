#!/usr/bin/env bash
# Install edge-agent as a systemd service (or remove it), idempotently.
#
#   sudo scripts/install.sh              install or upgrade, enable and (re)start the service
#   sudo scripts/install.sh --uninstall  stop and remove the service and the venv;
#                                        keep the config and the state
#   sudo scripts/install.sh --uninstall --purge   also remove the config and the state
#
# Options:
#   --root DIR    install under DIR (every path prefixed; for packaging and tests): no
#                 useradd, chown or systemctl there, they are printed instead
#   --dry-run     print every action, change nothing
#   --no-venv     do not create the venv or pip install (it is managed some other way)
#   --python EXE  the Python (>= 3.11) for the venv (default: python3)
#
# The layout (the same in systemd/edge-agent.service and systemd/edge-agent.tmpfiles):
#   /opt/edge-agent/venv         root:root 0755             the agent cannot modify its code
#   /etc/edge-agent/config.toml  root:edge-agent 0640       written once, never overwritten
#   /var/lib/edge-agent          edge-agent:edge-agent 0751 others may only traverse it
#   /var/lib/edge-agent/state    edge-agent:edge-agent 0700 the agent's own files
#   /var/lib/edge-agent/models   edge-agent:edge-agent-deploy 2770  the drop dir: members
#                                of edge-agent-deploy deploy; never world-writable
set -euo pipefail

# The venv and the unit must be readable by the agent's user whatever root's umask is.
umask 022

readonly AGENT_USER=edge-agent
readonly AGENT_GROUP=edge-agent
readonly DEPLOY_GROUP=edge-agent-deploy
readonly PREFIX=/opt/edge-agent
readonly VENV=/opt/edge-agent/venv
readonly CONFIG_DIR=/etc/edge-agent
readonly CONFIG=/etc/edge-agent/config.toml
readonly STATE_TOP=/var/lib/edge-agent
readonly STATE_DIR=/var/lib/edge-agent/state
readonly MODELS_DIR=/var/lib/edge-agent/models
readonly UNIT_NAME=edge-agent.service
readonly UNIT=/etc/systemd/system/edge-agent.service
readonly TMPFILES=/etc/tmpfiles.d/edge-agent.conf

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly REPO_DIR

ROOT=""
DRY_RUN=0
NO_VENV=0
UNINSTALL=0
PURGE=0
PYTHON=python3

say() { printf 'install.sh: %s\n' "$*"; }
die() {
    printf 'install.sh: error: %s\n' "$*" >&2
    exit 1
}

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

# Print a command; run it unless --dry-run.
run() {
    printf '+ %s\n' "$*"
    if ((DRY_RUN)); then
        return 0
    fi
    "$@"
}

# The path of an installed file: under --root DIR when given.
at() { printf '%s%s' "$ROOT" "$1"; }

parse_args() {
    while (($#)); do
        case $1 in
        --root)
            (($# >= 2)) || die "--root needs a directory, e.g. --root /tmp/edge-root"
            ROOT=$2
            shift
            ;;
        --root=*) ROOT=${1#--root=} ;;
        --dry-run) DRY_RUN=1 ;;
        --no-venv) NO_VENV=1 ;;
        --uninstall) UNINSTALL=1 ;;
        --purge) PURGE=1 ;;
        --python)
            (($# >= 2)) || die "--python needs an interpreter, e.g. --python /usr/bin/python3.11"
            PYTHON=$2
            shift
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        *) die "unknown option '$1'; see --help" ;;
        esac
        shift
    done
    if ((PURGE && !UNINSTALL)); then
        die "--purge only goes with --uninstall"
    fi
    if [[ -n $ROOT ]]; then
        [[ $ROOT == /* ]] || ROOT=$PWD/$ROOT
        ROOT=${ROOT%/}
        [[ -n $ROOT ]] || die "--root / is the real system; leave --root out instead"
    fi
}

check_privileges() {
    if [[ -z $ROOT ]] && ((!DRY_RUN)) && ((EUID != 0)); then
        die "installing a system service needs root; run with sudo, or use --root DIR or --dry-run"
    fi
}

# True when systemd runs as PID 1 (the test sd_booted(3) uses).
systemd_booted() { [[ -d /run/systemd/system ]]; }

# Set owner and group, or say it would under --root (the users exist only on the host).
own() {
    local owner=$1 path=$2
    if [[ -n $ROOT ]]; then
        say "--root: not running: chown $owner ${path#"$ROOT"}"
        return 0
    fi
    run chown "$owner" "$path"
}

# Create a directory (or fix an existing one) with owner and mode; chown before chmod so
# the set-group-ID bit is not lost.
make_dir() {
    local mode=$1 owner=$2 path=$3
    run mkdir -p "$path"
    own "$owner" "$path"
    run chmod "$mode" "$path"
}

ensure_users() {
    if [[ -n $ROOT ]]; then
        say "--root: not running: groupadd --system $DEPLOY_GROUP; useradd --system --user-group" \
            "--home-dir $STATE_TOP --no-create-home --shell /usr/sbin/nologin $AGENT_USER"
        return 0
    fi
    if ! getent group "$DEPLOY_GROUP" >/dev/null; then
        run groupadd --system "$DEPLOY_GROUP"
    fi
    if ! getent passwd "$AGENT_USER" >/dev/null; then
        run useradd --system --user-group --home-dir "$STATE_TOP" --no-create-home \
            --shell /usr/sbin/nologin --comment "edge-agent daemon" "$AGENT_USER"
    fi
}

ensure_dirs() {
    make_dir 0755 root:root "$(at "$PREFIX")"
    make_dir 0750 "root:$AGENT_GROUP" "$(at "$CONFIG_DIR")"
    make_dir 0751 "$AGENT_USER:$AGENT_GROUP" "$(at "$STATE_TOP")"
    make_dir 0700 "$AGENT_USER:$AGENT_GROUP" "$(at "$STATE_DIR")"
    make_dir 2770 "$AGENT_USER:$DEPLOY_GROUP" "$(at "$MODELS_DIR")"
}

install_venv() {
    if ((NO_VENV)); then
        say "skipping the venv and pip install (--no-venv)"
        return 0
    fi
    local venv
    venv=$(at "$VENV")
    if ((!DRY_RUN)) && ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        die "$PYTHON is older than Python 3.11 (or missing); pass --python /path/to/python3.11"
    fi
    if [[ ! -x $venv/bin/python ]]; then
        run "$PYTHON" -m venv "$venv" ||
            die "could not create $venv; on Debian: apt-get install python3-venv"
    fi
    run "$venv/bin/pip" install --quiet --upgrade "$REPO_DIR"
}

# Rewrite `dir = ...` in [models] and [state] of a config (stdin to stdout): the first such
# line in each section, commented out or not, becomes the installed path; a section with
# none gets one; a missing section is added at the end.
render_config() {
    awk -v models="$MODELS_DIR" -v state="$STATE_DIR" '
        function close_section() {
            if (section in want && !(section in done)) {
                printf "dir = \"%s\"\n", want[section]
                done[section] = 1
            }
        }
        BEGIN { want["models"] = models; want["state"] = state }
        /^[[:space:]]*\[[^]]*\][[:space:]]*(#.*)?$/ {
            close_section()
            section = $0
            sub(/^[[:space:]]*\[[[:space:]]*/, "", section)
            sub(/[[:space:]]*\].*$/, "", section)
            print
            next
        }
        section in want && /^[[:space:]]*#?[[:space:]]*dir[[:space:]]*=/ {
            if (!(section in done)) {
                printf "dir = \"%s\"\n", want[section]
                done[section] = 1
                next
            }
            if ($0 !~ /^[[:space:]]*#/) next
        }
        { print }
        END {
            close_section()
            for (name in want) {
                if (!(name in done)) printf "\n[%s]\ndir = \"%s\"\n", name, want[name]
            }
        }
    '
}

minimal_config() {
    printf '%s\n' \
        "# edge-agent configuration written by scripts/install.sh; every other setting is" \
        "# at its default (see config.example.toml in the source tree)."
}

write_config() {
    local target example tmp
    target=$(at "$CONFIG")
    example=$REPO_DIR/config.example.toml
    if [[ -e $target ]]; then
        say "keeping the existing $CONFIG"
        return 0
    fi
    if ((DRY_RUN)); then
        say "would write $CONFIG (mode 0640, root:$AGENT_GROUP) from $example," \
            "with [models] dir = $MODELS_DIR and [state] dir = $STATE_DIR"
        return 0
    fi
    tmp=$(mktemp "$target.XXXXXX")
    if [[ -f $example ]]; then
        render_config <"$example" >"$tmp"
    else
        say "no $example; writing a minimal config"
        minimal_config | render_config >"$tmp"
    fi
    own "root:$AGENT_GROUP" "$tmp"
    run chmod 0640 "$tmp"
    run mv "$tmp" "$target"
    say "wrote $CONFIG"
}

check_config() {
    local exe
    exe=$(at "$VENV")/bin/edge-agent
    if ((DRY_RUN)) || [[ -n $ROOT ]] || [[ ! -x $exe ]]; then
        return 0
    fi
    if ! run "$exe" check-config "$CONFIG"; then
        say "WARNING: $CONFIG has problems (above); fix them before the service can start"
    fi
}

# Copy a file into place with a mode; say when it was already up to date.
install_file() {
    local mode=$1 source=$2 target=$3
    if [[ -f $target ]] && cmp -s "$source" "$target"; then
        say "up to date: ${target#"$ROOT"}"
        run chmod "$mode" "$target"
        return 0
    fi
    run install -D -m "$mode" "$source" "$target"
}

install_units() {
    install_file 0644 "$REPO_DIR/systemd/edge-agent.service" "$(at "$UNIT")"
    install_file 0644 "$REPO_DIR/systemd/edge-agent.tmpfiles" "$(at "$TMPFILES")"
}

start_service() {
    local steps="systemctl daemon-reload; systemctl enable --now $UNIT_NAME (restart if running)"
    if [[ -n $ROOT ]]; then
        say "--root: not running: $steps"
        return 0
    fi
    if ! systemd_booted; then
        say "systemd is not running as PID 1 here (no /run/systemd/system); skipped: $steps"
        return 0
    fi
    run systemctl daemon-reload
    if systemctl is-active --quiet "$UNIT_NAME"; then
        run systemctl enable "$UNIT_NAME"
        run systemctl restart "$UNIT_NAME"
    else
        run systemctl enable --now "$UNIT_NAME"
    fi
}

stop_service() {
    if [[ -n $ROOT ]]; then
        say "--root: not running: systemctl disable --now $UNIT_NAME"
        return 0
    fi
    if ! systemd_booted; then
        say "systemd is not running as PID 1 here; skipped: systemctl disable --now $UNIT_NAME"
        return 0
    fi
    if [[ -f $UNIT ]]; then
        run systemctl disable --now "$UNIT_NAME"
    fi
}

install_all() {
    ensure_users
    ensure_dirs
    install_venv
    write_config
    check_config
    install_units
    start_service
    say "done. Deploy a model: add a user to $DEPLOY_GROUP (usermod -aG $DEPLOY_GROUP NAME)," \
        "then copy NAME.onnx into $MODELS_DIR (group-readable: mode 0640 or 0644)"
}

uninstall_all() {
    stop_service
    run rm -f "$(at "$UNIT")" "$(at "$TMPFILES")"
    if [[ -z $ROOT ]] && systemd_booted; then
        run systemctl daemon-reload
    fi
    run rm -rf "$(at "$PREFIX")"
    if ((PURGE)); then
        run rm -rf "$(at "$CONFIG_DIR")" "$(at "$STATE_TOP")"
        say "purged the config and the state; the user $AGENT_USER and the group" \
            "$DEPLOY_GROUP are kept (files elsewhere may still belong to them)"
    else
        say "kept $CONFIG_DIR and $STATE_TOP (models, store, outbox); --purge removes them"
    fi
}

main() {
    parse_args "$@"
    check_privileges
    if [[ -n $ROOT ]]; then
        run mkdir -p "$ROOT"
    fi
    if ((UNINSTALL)); then
        uninstall_all
    else
        install_all
    fi
}

main "$@"
