#!/usr/bin/env bash
# Install hsm-ca into .venv and run the main job on the built-in (soft) engine:
# a root CA, an issuing CA below it, a TLS server certificate signed from an OpenSSL CSR,
# checked by 'openssl verify', then the inventory and the audit-log check.
#
# Everything is written to a fresh temporary directory, or to $DEMO_DIR if set (it must
# not already hold a demo). The PINs are demo values passed through the environment.
set -euo pipefail

# shellcheck source=scripts/_venv.sh
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"

t0="$(now)"
# shellcheck disable=SC2317  # invoked through the EXIT trap
on_exit() {
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        printf '==> demo FAILED (exit %s) after %s; files so far: %s\n' \
            "$rc" "$(elapsed_since "$t0")" "${WORK:-<none>}" >&2
    fi
}
trap on_exit EXIT

check_dev_null "found so before the demo"
ensure_debian_tools openssl:openssl
ensure_venv ""

if [ -n "${DEMO_DIR:-}" ]; then
    mkdir -p "$DEMO_DIR"
    WORK="$(cd "$DEMO_DIR" && pwd -P)"
    [ ! -e "$WORK/home" ] || die "DEMO_DIR=$WORK already holds a demo (home/); use an empty directory"
else
    WORK="$(mktemp -d "${TMPDIR:-/tmp}/hsm-ca-demo.XXXXXX")"
fi
H="$WORK/home"
cd "$WORK"
say "demo directory: $WORK (CA home: $H)"

# Demo PINs: in the environment only, never on a command line.
export HSM_CA_PIN="demo-user-pin-2468"
export HSM_CA_SO_PIN="demo-officer-pin-1357"
unset HSM_CA_HOME HSM_CA_USER

# Echo a command (quoting arguments that need it), then run it.
run() {
    local arg line=""
    for arg in "$@"; do
        case "$arg" in
            *[[:space:]\'\"\$\;\&\|\<\>\(\)\*\?]*) line+=" '${arg//\'/\'\\\'\'}'" ;;
            *) line+=" $arg" ;;
        esac
    done
    printf '\n$%s\n' "$line"
    "$@"
}

run hsm-ca --home "$H" init --base-url http://pki.example.com
run hsm-ca --home "$H" ca create-root root \
    --subject 'CN=Demo Root CA,O=hsm-ca demo,C=NL' --key-type ec-p384
run hsm-ca --home "$H" ca create-intermediate issuing --parent root \
    --subject 'CN=Demo Issuing CA,O=hsm-ca demo,C=NL' --key-type ec-p256 --path-length 0
run openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout web.key \
    -subj /CN=www.example.com -addext subjectAltName=DNS:www.example.com,DNS:example.com \
    -out web.csr
run hsm-ca --home "$H" sign web.csr --ca issuing --profile tls-server --chain -o web.pem
run hsm-ca --home "$H" ca export root -o root.pem
run openssl verify -CAfile root.pem -untrusted web.pem web.pem
run hsm-ca --home "$H" list
run hsm-ca --home "$H" keys list
run hsm-ca --home "$H" audit verify

cat <<EOF

==> demo OK in $(elapsed_since "$t0"). Files in $WORK:
    home/     the CA home (config, SQLite store, encrypted soft-HSM keys, audit log)
    root.pem  the root CA certificate (trust anchor)
    web.key   the TLS server's private key (made by openssl, never seen by the CA)
    web.csr   its certificate signing request
    web.pem   the signed server certificate followed by the issuing CA certificate
    Try:  HSM_CA_PIN=$HSM_CA_PIN $VENV/bin/hsm-ca --home $H ca list
EOF
