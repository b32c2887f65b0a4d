"""End-to-end tests of taser's command line: version output and exit codes for bad flags."""

from __future__ import annotations

import subprocess

import pytest

USAGE_ERROR = 2


def run_taser(taser_bin, *args):
    return subprocess.run([str(taser_bin), *args], capture_output=True, text=True, timeout=30)


def test_version_prints_one_line(taser_bin):
    completed = run_taser(taser_bin, "version")

    lines = completed.stdout.strip().splitlines()
    assert completed.returncode == 0, completed.stderr
    assert len(lines) == 1
    assert any(character.isdigit() for character in lines[0])


@pytest.mark.parametrize(
    "args",
    [
        ["no-such-mode"],
        ["broker", "--no-such-flag"],
        ["bridge", "--no-such-flag"],
        # A broker without --bridge-ca cannot check bridge certificates.
        [
            "broker",
            "--listen",
            "127.0.0.1:0",
            "--plaintext",
            "--bridge-listen",
            "127.0.0.1:0",
            "--bridge-cert",
            "broker.pem",
            "--bridge-key",
            "broker-key.pem",
        ],
    ],
    ids=["unknown-mode", "broker-unknown-flag", "bridge-unknown-flag", "broker-missing-bridge-ca"],
)
def test_bad_flags_exit_2(taser_bin, args):
    completed = run_taser(taser_bin, *args)

    assert completed.returncode == USAGE_ERROR, completed.stderr
    assert completed.stderr.strip() != ""
