#!/usr/bin/env bash
# Build the example PKI of examples/pki.toml in a fresh home, check it with openssl,
# and show that a second run creates nothing. PINs come from the environment only.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="${EXAMPLE_DIR:-$(mktemp -d)}"
mkdir -p "$work"
cp "$repo/examples/pki.toml" "$work/pki.toml"
export HSM_CA_HOME="$work/home"
export HSM_CA_PIN="${HSM_CA_PIN:-example-user-pin}"
export HSM_CA_SO_PIN="${HSM_CA_SO_PIN:-example-officer-pin}"
hsm_ca=(hsm-ca)
if ! command -v hsm-ca >/dev/null 2>&1; then
    if [[ -x "$repo/.venv/bin/hsm-ca" ]]; then hsm_ca=("$repo/.venv/bin/hsm-ca"); else hsm_ca=(python3 -m hsm_ca); fi
fi
cd "$work"
[[ -f web.csr ]] || openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout web.key -subj "/CN=www.example.com" \
    -addext "subjectAltName=DNS:www.example.com,DNS:example.com" -out web.csr 2>/dev/null
echo "==> plan"
"${hsm_ca[@]}" bootstrap pki.toml --plan ${EXAMPLE_SCRYPT_N:+--scrypt-n "$EXAMPLE_SCRYPT_N"}
echo "==> apply"
"${hsm_ca[@]}" bootstrap pki.toml ${EXAMPLE_SCRYPT_N:+--scrypt-n "$EXAMPLE_SCRYPT_N"}
echo "==> verify"
openssl verify -CAfile out/trust.pem -untrusted out/web.pem out/web.pem
openssl verify -CAfile out/trust.pem -untrusted out/backup-agent.pem out/backup-agent.pem
echo "==> apply again (creates nothing)"
"${hsm_ca[@]}" bootstrap pki.toml
"${hsm_ca[@]}" audit verify
echo "example PKI in $work"
