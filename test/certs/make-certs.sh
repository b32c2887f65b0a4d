#!/usr/bin/env bash
# Generate throwaway certificates for taser's tests and demo with the openssl CLI.
#
# Usage: test/certs/make-certs.sh OUTDIR
#
# Writes into OUTDIR (keys are EC P-256, mode 0600):
#   ca.pem, ca-key.pem                   tunnel CA: signs the broker and the bridge
#   broker.pem, broker-key.pem           broker's bridge-edge server cert
#                                        (serverAuth, DNS:localhost, IP:127.0.0.1, IP:::1)
#   bridge.pem, bridge-key.pem           bridge client cert (clientAuth, CN=bridge)
#   client-ca.pem, client-ca-key.pem     separate CA for the broker's HTTPS edge for pods
#   client-edge.pem, client-edge-key.pem broker's HTTPS cert for pods (serverAuth, localhost)
#   other-ca.pem, other-ca-key.pem       unrelated CA
#   other-bridge.pem, other-bridge-key.pem        bridge cert signed by other-ca
#   expired-bridge.pem, expired-bridge-key.pem    tunnel CA, notAfter one day ago
#   notyet-bridge.pem, notyet-bridge-key.pem      tunnel CA, notBefore one day ahead
#   server-only-bridge.pem, server-only-bridge-key.pem  tunnel CA, serverAuth EKU only
#   vault-ca.pem, vault-ca-key.pem       CA for a vault stand-in serving HTTPS
#   vault.pem, vault-key.pem             vault stand-in server cert (localhost)
#
# The usual certificates start 5 minutes in the past to tolerate clock skew.
# OpenSSL 3.0 (Debian 12) has no option to set notBefore on `openssl x509` or
# `openssl req -x509`, so every certificate, CA ones included, is issued by
# `openssl ca`, which takes -startdate and -enddate.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi

out_dir=$1
mkdir -p "$out_dir"
out_dir=$(cd "$out_dir" && pwd)

work_dir=$(mktemp -d "${TMPDIR:-/tmp}/taser-certs.XXXXXX")
trap 'rm -rf "$work_dir"' EXIT

# openssl ca takes times as YYYYMMDDHHMMSSZ (GeneralizedTime), in UTC.
utc_time() {
    date -u -d "$1" +%Y%m%d%H%M%SZ
}

valid_from=$(utc_time '-5 minutes')
valid_until=$(utc_time '+30 days')
ca_valid_until=$(utc_time '+365 days')

cat >"$work_dir/extensions.cnf" <<'EOF'
[ca_ext]
basicConstraints = critical, CA:true, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash

[server_ext]
basicConstraints = critical, CA:false
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = DNS:localhost, IP:127.0.0.1, IP:::1

[client_ext]
basicConstraints = critical, CA:false
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
EOF

# Write a private key readable by its owner only.
make_key() {
    local key_file=$1
    (umask 077 && openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 \
        -out "$key_file")
    chmod 600 "$key_file"
}

# Create the openssl ca database and config for the CA called NAME.
init_ca_dir() {
    local name=$1
    local ca_dir=$work_dir/$name
    mkdir -p "$ca_dir/issued"
    : >"$ca_dir/index.txt"
    cat >"$ca_dir/ca.cnf" <<EOF
[ca]
default_ca = taser_test_ca

[taser_test_ca]
database = $ca_dir/index.txt
new_certs_dir = $ca_dir/issued
serial = $ca_dir/serial
default_md = sha256
policy = policy_any
unique_subject = no
copy_extensions = none
certificate = $out_dir/$name.pem
private_key = $out_dir/$name-key.pem

[policy_any]
organizationName = optional
commonName = supplied
EOF
}

# Issue a certificate with openssl ca.
# Usage: issue CA_NAME CERT_NAME SUBJECT EXTENSION_SECTION NOT_BEFORE NOT_AFTER [--selfsign]
issue() {
    local ca_name=$1 cert_name=$2 subject=$3 extension_section=$4 not_before=$5 not_after=$6
    shift 6
    local -a sign_args=()
    if [[ ${1:-} == --selfsign ]]; then
        sign_args=(-selfsign -keyfile "$out_dir/$cert_name-key.pem")
    fi

    make_key "$out_dir/$cert_name-key.pem"
    openssl req -new -key "$out_dir/$cert_name-key.pem" -subj "$subject" \
        -out "$work_dir/$cert_name.csr"
    openssl ca -batch -notext -rand_serial \
        -config "$work_dir/$ca_name/ca.cnf" "${sign_args[@]}" \
        -in "$work_dir/$cert_name.csr" -out "$out_dir/$cert_name.pem" \
        -extfile "$work_dir/extensions.cnf" -extensions "$extension_section" \
        -startdate "$not_before" -enddate "$not_after" 2>"$work_dir/$cert_name.log" || {
        cat "$work_dir/$cert_name.log" >&2
        echo "$0: failed to issue $cert_name.pem" >&2
        return 1
    }
    chmod 644 "$out_dir/$cert_name.pem"
}

make_ca() {
    local name=$1 common_name=$2
    init_ca_dir "$name"
    issue "$name" "$name" "/O=taser test/CN=$common_name" ca_ext \
        "$valid_from" "$ca_valid_until" --selfsign
}

make_ca ca "taser test tunnel CA"
make_ca client-ca "taser test client edge CA"
make_ca other-ca "taser test unrelated CA"
make_ca vault-ca "taser test vault CA"

issue ca broker "/O=taser test/CN=localhost" server_ext "$valid_from" "$valid_until"
issue ca bridge "/O=taser test/CN=bridge" client_ext "$valid_from" "$valid_until"
issue ca expired-bridge "/O=taser test/CN=bridge" client_ext \
    "$(utc_time '-2 days')" "$(utc_time '-1 day')"
issue ca notyet-bridge "/O=taser test/CN=bridge" client_ext \
    "$(utc_time '+1 day')" "$(utc_time '+30 days')"
issue ca server-only-bridge "/O=taser test/CN=bridge" server_ext "$valid_from" "$valid_until"
issue other-ca other-bridge "/O=taser test/CN=bridge" client_ext "$valid_from" "$valid_until"
issue client-ca client-edge "/O=taser test/CN=localhost" server_ext "$valid_from" "$valid_until"
issue vault-ca vault "/O=taser test/CN=localhost" server_ext "$valid_from" "$valid_until"

# Sanity check: the usual certificates verify against their CA right now.
for pair in ca:broker ca:bridge client-ca:client-edge other-ca:other-bridge vault-ca:vault; do
    openssl verify -CAfile "$out_dir/${pair%%:*}.pem" "$out_dir/${pair#*:}.pem" >/dev/null
done

echo "certificates written to $out_dir"
