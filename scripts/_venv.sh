#!/usr/bin/env bash
# Shared set-up for scripts/test.sh and scripts/demo.sh. Source it, don't run it.
#
# After sourcing, from the repository root:
#   ensure_debian_tools CMD:PACKAGE ...   apt-get install PACKAGE for each missing CMD
#   ensure_venv EXTRAS                    create/reuse .venv, pip install -e ".[EXTRAS]"
#                                         (EXTRAS may be empty), then put .venv/bin on PATH
#
# Environment knobs:
#   PYTHON=/path/to/python3   interpreter for a new .venv (default: python3)
#   HSM_CA_VENV=DIR           virtualenv location (default: <repo>/.venv)
#   HSM_CA_FORCE_INSTALL=1    ignore the install stamp and run pip again

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    echo "scripts/_venv.sh is a helper for scripts/test.sh and scripts/demo.sh: source it" >&2
    exit 2
fi

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
VENV="${HSM_CA_VENV:-$REPO_ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
MIN_PY_MINOR=11   # requires-python = ">=3.11"
MIN_PIP_MAJOR=23  # PEP 660 editable installs need >= 21.3; stay well past that

# Prefix for our own messages so they stand out from pip/pytest output.
say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'ERROR: %s\n' "$*" >&2; exit 1; }

# Much of the tooling (apt's signature checks among it) breaks if /dev/null has been
# replaced by a regular file, e.g. by an atomic write "to" /dev/null as root.
check_dev_null() {
    [ -c /dev/null ] || die "/dev/null is not a character device any more ($1).
       Restore it as root with: rm -f /dev/null && mknod -m 666 /dev/null c 1 3"
}

# Wall-clock seconds with millisecond precision, no external tools.
now() { printf '%s' "${EPOCHREALTIME:-$(date +%s)}"; }
elapsed_since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2fs", b - a }'; }

_as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root to run '$*' (not root, and sudo is not installed); install it by hand"
    fi
}

_APT_UPDATED=0
_apt_install() {
    command -v apt-get >/dev/null 2>&1 ||
        die "missing system packages ($*) and apt-get is not available; install them by hand"
    if [ "$_APT_UPDATED" -eq 0 ]; then
        say "apt-get update"
        _as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq ||
            die "apt-get update failed"
        _APT_UPDATED=1
    fi
    local log
    log="$(mktemp "${TMPDIR:-/tmp}/hsm-ca-apt.XXXXXX.log")"
    say "apt-get install -y --no-install-recommends $* (log: $log)"
    if ! _as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "$@" </dev/null >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        die "apt-get install $* failed; full log: $log"
    fi
    grep -E '^Setting up ' "$log" | sed 's/^/    /' >&2 || true
}

# ensure_debian_tools softhsm2-util:softhsm2 pkcs11-tool:opensc openssl:openssl
ensure_debian_tools() {
    local spec cmd pkg missing=()
    for spec in "$@"; do
        cmd="${spec%%:*}"
        pkg="${spec#*:}"
        if ! command -v "$cmd" >/dev/null 2>&1; then
            missing+=("$pkg")
        fi
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        return 0
    fi
    say "system tools missing; installing Debian packages: ${missing[*]}"
    _apt_install "${missing[@]}"
    for spec in "$@"; do
        command -v "${spec%%:*}" >/dev/null 2>&1 ||
            die "'${spec%%:*}' still not found after installing ${spec#*:}"
    done
}

# A base interpreter that can make a venv with pip in it (Debian splits venv/ensurepip
# out into python3-venv).
_ensure_base_python() {
    if ! command -v "$PYTHON" >/dev/null 2>&1; then
        [ "$PYTHON" = python3 ] || die "PYTHON=$PYTHON not found"
        say "python3 not found"
        _apt_install python3 python3-venv python3-dev gcc
    fi
    "$PYTHON" -c "import sys; sys.exit(sys.version_info < (3, $MIN_PY_MINOR))" ||
        die "$("$PYTHON" --version 2>&1) is too old: hsm-ca needs Python >= 3.$MIN_PY_MINOR (set PYTHON=...)"
    if ! "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1; then
        [ "$PYTHON" = python3 ] || die "$PYTHON cannot create virtualenvs (no venv/ensurepip)"
        say "python3 cannot create virtualenvs (no ensurepip)"
        _apt_install python3-venv
    fi
}

# The stamp records what was installed, from which venv path; it is valid while it is
# newer than pyproject.toml (editable install: source edits need no reinstall).
_stamp_file() { printf '%s/.hsm-ca-installed%s' "$VENV" "${1:+[$1]}"; }

_stamp_fresh() {
    local stamp
    stamp="$(_stamp_file "$1")"
    [ -f "$stamp" ] && [ "$stamp" -nt "$REPO_ROOT/pyproject.toml" ] &&
        [ "$(cat "$stamp")" = "$VENV" ]
}

_venv_usable() {
    [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c \
        "import sys; sys.exit(sys.version_info < (3, $MIN_PY_MINOR) or sys.prefix == sys.base_prefix)" \
        >/dev/null 2>&1
}

ensure_venv() {
    local extras="${1:-}" spec log started
    started="$(now)"
    if [ "${HSM_CA_FORCE_INSTALL:-0}" != 1 ] && _stamp_fresh "$extras"; then
        :
    elif [ "${HSM_CA_FORCE_INSTALL:-0}" != 1 ] && [ -z "$extras" ] && _stamp_fresh "test,pkcs11"; then
        : # the test install is a superset of the plain one
    else
        if [ -e "$VENV" ] && ! _venv_usable; then
            say "virtualenv $VENV is broken; recreating it"
            rm -rf "$VENV"
        elif [ -e "$VENV" ] && grep -qsvxF "$VENV" "$VENV"/.hsm-ca-installed*; then
            say "virtualenv $VENV was made at another path; recreating it"
            rm -rf "$VENV"
        fi
        if [ ! -e "$VENV" ]; then
            _ensure_base_python
            say "creating virtualenv $VENV ($("$PYTHON" --version 2>&1))"
            "$PYTHON" -m venv "$VENV" || die "python -m venv $VENV failed"
        fi
        if ! "$VENV/bin/python" -c \
            "import sys, pip; sys.exit(int(pip.__version__.split('.')[0]) < $MIN_PIP_MAJOR)" \
            >/dev/null 2>&1; then
            say "upgrading pip in the virtualenv"
            "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip ||
                die "could not upgrade pip"
        fi
        spec=".${extras:+[$extras]}"
        log="$VENV/pip-install.log"
        say "pip install -e '$spec' (log: $log)"
        if ! (cd "$REPO_ROOT" && "$VENV/bin/python" -m pip install --disable-pip-version-check \
                --progress-bar off -e "$spec") >"$log" 2>&1; then
            tail -n 30 "$log" >&2
            if grep -qiE 'wheels? for python-pkcs11|failed to build python-pkcs11|python-pkcs11.*(did not run successfully|exited-with-error)' "$log"; then
                die "building python-pkcs11 (the 'pkcs11' extra) failed. It compiles a C extension when
       no wheel fits this platform: it needs a C compiler and the Python headers
       (Debian: apt-get install gcc python3-dev). Full log: $log"
            fi
            die "pip install -e '$spec' failed; full log: $log"
        fi
        printf '%s' "$VENV" >"$(_stamp_file "$extras")"
        say "installed in $(elapsed_since "$started")"
    fi
    export VIRTUAL_ENV="$VENV"
    export PATH="$VENV/bin:$PATH"
    hash -r
}
