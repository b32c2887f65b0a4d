"""`taser certs` writes a working CA, broker and bridge certificates with their pins."""

import stat
import subprocess

from http_clients import curl_json
from taser_harness import Bridge, Broker, child_env


def test_certs_command_writes_working_set(taser_bin, harness, standin, tmp_path):
    out = tmp_path / "trial"
    completed = subprocess.run(
        [str(taser_bin), "certs", "--out", str(out), "--broker-host", "localhost",
         "--broker-host", "127.0.0.1"], capture_output=True, timeout=30)
    assert completed.returncode == 0, completed.stderr

    for key in ("ca-key.pem", "broker-key.pem", "bridge-key.pem"):
        assert stat.S_IMODE((out / key).stat().st_mode) == 0o600
    pins = dict(line.split() for line in (out / "pins.txt").read_text().splitlines())
    assert pins["broker"].startswith("sha256//")

    # The trial set serves both edges here: the broker's client port uses the broker
    # certificate too, which names localhost and 127.0.0.1.
    certs = harness.certs
    broker = Broker(taser_bin, certs, harness.work_dir, name="trial-broker",
                    extra_args=["--bridge-pin", pins["bridge"]], env=child_env())
    broker.argv = [a.replace(str(certs / "broker.pem"), str(out / "broker.pem"))
                   .replace(str(certs / "broker-key.pem"), str(out / "broker-key.pem"))
                   .replace(str(certs / "ca.pem"), str(out / "ca.pem")) for a in broker.argv]
    harness._track(broker)
    broker.start()
    bridge = Bridge(taser_bin, certs, harness.work_dir, broker, standin.url, name="trial-bridge",
                    extra_args=["--broker-pin", pins["broker"]], env=child_env())
    bridge.argv = [a.replace(str(certs / "bridge.pem"), str(out / "bridge.pem"))
                   .replace(str(certs / "bridge-key.pem"), str(out / "bridge-key.pem"))
                   .replace(str(certs / "ca.pem"), str(out / "ca.pem")) for a in bridge.argv]
    harness._track(bridge)
    bridge.start()

    status, _, _ = curl_json(f"{broker.url}/v1/sys/health", cafile=broker.client_ca)
    assert status == 200


def test_certs_command_refuses_to_overwrite(taser_bin, tmp_path):
    argv = [str(taser_bin), "certs", "--out", str(tmp_path), "--broker-host", "broker.test"]
    assert subprocess.run(argv, capture_output=True, timeout=30).returncode == 0

    again = subprocess.run(argv, capture_output=True, timeout=30)

    assert again.returncode == 2
    assert b"--force" in again.stderr
