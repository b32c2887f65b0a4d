"""In passthrough mode pods verify the vault's own certificate against the name they dial."""

import subprocess
from pathlib import Path

from taser_harness import StandIn, child_env

SERVICE = "taser-broker.vault.svc"


def issue_vault_cert(certs: Path, out: Path, names: list[str]) -> tuple[Path, Path]:
    """Issues a server certificate from the vault's CA for NAMES."""
    key, csr, cert, ext = (out / "vault-svc-key.pem", out / "vault-svc.csr",
                           out / "vault-svc.pem", out / "vault-svc.ext")
    ext.write_text("extendedKeyUsage=serverAuth\nsubjectAltName=" +
                   ",".join(f"DNS:{n}" for n in names) + "\n")
    subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout",
                    "-out", str(key)], check=True, capture_output=True)
    subprocess.run(["openssl", "req", "-new", "-key", str(key), "-subj", f"/CN={names[0]}",
                    "-out", str(csr)], check=True, capture_output=True)
    subprocess.run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(certs / "vault-ca.pem"),
                    "-CAkey", str(certs / "vault-ca-key.pem"), "-CAcreateserial", "-days", "1",
                    "-extfile", str(ext), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def curl_health(port: int, host: str, cafile: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "20",
         "--cacert", str(cafile), "--resolve", f"{host}:{port}:127.0.0.1",
         f"https://{host}:{port}/v1/sys/health"], capture_output=True, timeout=30)


def start_tls_standin(harness, cert: Path, key: Path) -> StandIn:
    standin = StandIn(harness.work_dir, name="standin-svc", tls_cert=cert, tls_key=key,
                      env=child_env())
    harness._track(standin)
    return standin.start()


def test_vault_cert_must_name_the_service(harness, certs, tmp_path):
    # The usual vault certificate names localhost only, not the broker's service name.
    standin = harness.start_standin(tls=True)
    broker = harness.start_passthrough_broker()
    harness.start_bridge(broker, standin, extra_args=["--allow-tunnels"])

    done = curl_health(broker.client_port, SERVICE, certs / "vault-ca.pem")

    assert done.returncode == 60, done.stderr  # curl: the peer's certificate was not accepted
    assert b"no alternative certificate subject name matches" in done.stderr


def test_vault_cert_with_service_name_verifies(harness, certs, tmp_path):
    cert, key = issue_vault_cert(certs, tmp_path, [SERVICE, "localhost"])
    standin = start_tls_standin(harness, cert, key)
    broker = harness.start_passthrough_broker()
    harness.start_bridge(broker, standin, extra_args=["--allow-tunnels"])

    done = curl_health(broker.client_port, SERVICE, certs / "vault-ca.pem")

    assert done.returncode == 0, done.stderr
    assert done.stdout == b"200"


def test_tls_server_name_override_verifies(harness, certs):
    # What VAULT_TLS_SERVER_NAME does: dial the service, verify the name the certificate has.
    import ssl
    import socket

    standin = harness.start_standin(tls=True)
    broker = harness.start_passthrough_broker()
    harness.start_bridge(broker, standin, extra_args=["--allow-tunnels"])
    context = ssl.create_default_context(cafile=str(certs / "vault-ca.pem"))

    with socket.create_connection(("127.0.0.1", broker.client_port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"GET /v1/sys/health HTTP/1.1\r\nHost: " + SERVICE.encode() +
                        b"\r\nConnection: close\r\n\r\n")
            reply = tls.recv(64)

    assert reply.startswith(b"HTTP/1.1 200")
