#!/usr/bin/env bash
# The project's test command: installs what the tests need, then runs pytest.
# pytest starts (and stops) the private dockerd itself; the EXIT trap below only
# reaps what a crashed or interrupted run left behind.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

log() { printf 'tests/run.sh: %s\n' "$*" >&2; }

# --- system packages -------------------------------------------------------
# "command:package" (or "dpkg:package" when only the package itself tells).
REQUIRED=(
    dockerd:docker.io
    containerd:containerd
    ctr:containerd
    runc:runc
    dpkg:busybox-static
    haproxy:haproxy
    promtool:prometheus
    curl:curl
    node:nodejs
    docker-compose:docker-compose
    debootstrap:debootstrap
    dpkg:debian-archive-keyring # debootstrap checks bookworm's signatures with it
    dpkg:python3-venv
)
# sbin is not on every root PATH (e.g. after a bare `su`).
export PATH="$PATH:/usr/sbin:/sbin"
missing=()
for entry in "${REQUIRED[@]}"; do
    check="${entry%%:*}" pkg="${entry#*:}"
    if [[ "$check" == dpkg ]]; then
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' && continue
    else
        command -v "$check" >/dev/null 2>&1 && continue
    fi
    [[ " ${missing[*]-} " == *" $pkg "* ]] || missing+=("$pkg")
done
if ((${#missing[@]})); then
    log "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- virtualenv --------------------------------------------------------------
# Debian's interpreter, not one under /root: tests run the daemon as uid 65534.
PY=/usr/bin/python3
[[ -x "$PY" ]] || PY="$(command -v python3)"
VENV="$REPO/.venv"
want_home="$(dirname "$PY")"
if [[ -f "$VENV/pyvenv.cfg" ]] && ! grep -qx "home = $want_home" "$VENV/pyvenv.cfg"; then
    log "recreating $VENV (made from another interpreter)"
    rm -rf "$VENV"
fi
if [[ ! -x "$VENV/bin/python" ]]; then
    "$PY" -m venv "$VENV"
fi
# Reinstall only when the project's metadata or the interpreter changed.
stamp="$VENV/.hls-install-stamp"
want_stamp="$(sha256sum pyproject.toml | cut -d' ' -f1) $("$VENV/bin/python" -c 'import sys; print(sys.version)' | head -1)"
if [[ ! -f "$stamp" ]] || [[ "$(cat "$stamp")" != "$want_stamp" ]]; then
    log "installing the project into $VENV"
    "$VENV/bin/python" -m pip install -q -e ".[test]"
    printf '%s\n' "$want_stamp" >"$stamp"
fi

# --- leftovers of this run -------------------------------------------------
# tests/dockerd.py appends every pid it starts to $RUNDIR/pids and every engine
# directory to $RUNDIR/dirs. A process is killed only if its command line still
# names one of those directories, so a recycled pid is never hit.
RUNDIR="$(mktemp -d /tmp/hls-run.XXXXXX)"
export SUPERVISOR_TEST_RUNDIR="$RUNDIR"

names_run_dir() { # pid -> true if its command line mentions a dir of this run
    local cmdline dir
    cmdline="$(tr '\0' ' ' 2>/dev/null <"/proc/$1/cmdline")" || return 1
    while IFS= read -r dir; do
        [[ -n "$dir" && "$cmdline" == *"$dir"* ]] && return 0
    done <"$RUNDIR/dirs"
    return 1
}

reap() {
    local rc=$? pid dir f id mnt
    if [[ -n "${PYTEST_PID-}" ]] && kill -0 "$PYTEST_PID" 2>/dev/null; then
        kill -9 "$PYTEST_PID" 2>/dev/null || true
    fi
    if [[ -s "$RUNDIR/dirs" ]]; then
        # Container init processes first: killing a pid namespace's init ends it.
        # The cgroup check makes sure a recycled pid is not hit.
        while IFS= read -r dir; do
            for f in "$dir"/cd/state/io.containerd.runtime.v2.task/*/*/init.pid; do
                [[ -f "$f" ]] || continue
                pid="$(cat "$f")" id="$(basename "$(dirname "$f")")"
                grep -qs "$id" "/proc/$pid/cgroup" && kill -9 "$pid" 2>/dev/null || true
            done
        done <"$RUNDIR/dirs"
        # Then daemons and shims: recorded pids, and anything else naming a dir.
        for pid in $(cat "$RUNDIR/pids" 2>/dev/null) $(ls /proc | grep -E '^[0-9]+$'); do
            [[ "$pid" != "$$" ]] && names_run_dir "$pid" && {
                log "killing leftover process $pid"
                kill -9 "$pid" 2>/dev/null || true
            }
        done
        sleep 0.2
        while IFS= read -r dir; do
            [[ -d "$dir" ]] || continue
            # Deepest mounts first, lazily: a dying process may still hold one.
            awk -v d="$dir/" 'index($2, d) == 1 { print $2 }' /proc/self/mounts | sort -r |
                while IFS= read -r mnt; do umount -l "$mnt" 2>/dev/null || true; done
            rm -rf "$dir" 2>/dev/null || log "could not remove $dir"
        done <"$RUNDIR/dirs"
    fi
    rm -rf "$RUNDIR"
    exit "$rc"
}
trap reap EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP
: >"$RUNDIR/pids"
: >"$RUNDIR/dirs"

# --- tests ------------------------------------------------------------------
# pytest runs in the background so that a TERM to this script is handled at once:
# it becomes an INT for pytest, whose fixtures then stop their engines in order;
# after 30 s the EXIT trap kills what is left. A Ctrl-C reaches pytest from the
# terminal by itself. The subshell undoes bash's ignoring of INT in background
# jobs; stdin stays the terminal's, for --pdb.
(
    trap - INT
    exec "$VENV/bin/python" -m pytest "$@"
) <&0 &
PYTEST_PID=$!
signalled=0
trap 'signalled=130' INT
trap 'signalled=143; kill -INT "$PYTEST_PID" 2>/dev/null || true' TERM HUP
while :; do
    rc=0
    wait "$PYTEST_PID" || rc=$?
    kill -0 "$PYTEST_PID" 2>/dev/null || break # else a signal cut the wait short
    if ((signalled == 143)); then
        for _ in {1..150}; do
            kill -0 "$PYTEST_PID" 2>/dev/null || break
            sleep 0.2
        done
        break
    fi
done
if ((signalled)); then
    exit "$signalled"
fi
PYTEST_PID=
if ((rc == 5)); then
    log "pytest collected no tests: that is a failure"
    rc=1
fi
exit "$rc"
