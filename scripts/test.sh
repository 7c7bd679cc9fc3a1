#!/usr/bin/env bash
# Run the whole hsm-ca test suite: set up .venv and the system tools (SoftHSM2, OpenSC,
# OpenSSL, GnuTLS's certtool) when missing, lint with ruff, then pytest. Arguments go to pytest:
#   scripts/test.sh -x -q
#   scripts/test.sh -k audit
# Works from any directory (pytest runs from the repository root, so give test paths
# relative to it). See scripts/_venv.sh for the environment knobs.
set -euo pipefail

# shellcheck source=scripts/_venv.sh
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$REPO_ROOT"

t0="$(now)"
# shellcheck disable=SC2317  # invoked through the EXIT trap
finish() {
    local rc=$?
    printf '==> test.sh: %s after %s\n' "$([ "$rc" -eq 0 ] && echo OK || echo "FAILED (exit $rc)")" \
        "$(elapsed_since "$t0")" >&2
}
trap finish EXIT

say "setup"
check_dev_null "found so before the run"
ensure_debian_tools softhsm2-util:softhsm2 pkcs11-tool:opensc openssl:openssl certtool:gnutls-bin
ensure_venv "test,pkcs11"
say "setup done in $(elapsed_since "$t0")"

say "ruff check hsm_ca tests scripts"
ruff check hsm_ca tests scripts || die "ruff found problems (fix them, or try 'ruff check --fix')"

say "python -m pytest $*"
rc=0
python -m pytest "$@" || rc=$?
check_dev_null "replaced during the test run"
if [ "$rc" -eq 5 ]; then
    die "pytest collected no tests (exit 5): that counts as a failure"
fi
exit "$rc"
