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


def broker_argv(taser_bin, certs, *extra):
    return [str(taser_bin), "broker", "--plaintext", "--listen", "127.0.0.1:0",
            "--bridge-listen", "127.0.0.1:0", "--admin-listen", "off",
            "--bridge-cert", str(certs / "broker.pem"), "--bridge-key", str(certs / "broker-key.pem"),
            "--bridge-ca", str(certs / "ca.pem"), *extra]


def run_with_env(argv, env_extra=None):
    import os
    import subprocess

    env = dict(os.environ)
    env.update(env_extra or {})
    return subprocess.run(argv, capture_output=True, timeout=30, env=env)


def test_flag_beats_environment(taser_bin, certs):
    done = run_with_env(broker_argv(taser_bin, certs, "--bridge-wait", "bogus-flag"),
                     {"TASER_BRIDGE_WAIT": "2s"})

    assert done.returncode == 2
    assert b"bogus-flag" in done.stderr


def test_environment_beats_config_file(taser_bin, certs, tmp_path):
    config = tmp_path / "broker.conf"
    config.write_text("bridge-wait = 3s\n")

    done = run_with_env(broker_argv(taser_bin, certs, "--config", str(config)),
                     {"TASER_BRIDGE_WAIT": "bogus-env"})

    assert done.returncode == 2
    assert b"bogus-env" in done.stderr


def test_config_file_is_read(taser_bin, certs, tmp_path):
    config = tmp_path / "broker.conf"
    config.write_text("# a comment\nbridge-wait = bogus-file\n")

    done = run_with_env(broker_argv(taser_bin, certs, "--config", str(config)))

    assert done.returncode == 2
    assert b"bogus-file" in done.stderr


def test_config_file_unknown_key_is_an_error(taser_bin, certs, tmp_path):
    config = tmp_path / "broker.conf"
    config.write_text("bridge-wiat = 3s\n")

    done = run_with_env(broker_argv(taser_bin, certs, "--config", str(config)))

    assert done.returncode == 2
    assert b"bridge-wiat" in done.stderr


@pytest.mark.parametrize("flag,value,expected", [
    ("--bridge-wait", "5 s", b"duration"),
    ("--max-body-size", "12XB", b"size"),
    ("--max-bridges", "-1", b"whole number"),
    ("--max-header-size", "100", b"1KiB"),
])
def test_invalid_values_name_the_unit(taser_bin, certs, flag, value, expected):
    done = run_with_env(broker_argv(taser_bin, certs, flag, value))

    assert done.returncode == 2
    assert expected in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_bridge_header_block_range(taser_bin, certs):
    done = run_with_env([str(taser_bin), "bridge", "--broker-address", "localhost:1",
                         "--ca-cert", str(certs / "ca.pem"), "--client-cert", str(certs / "bridge.pem"),
                         "--client-key", str(certs / "bridge-key.pem"), "--max-header-block", "100"])

    assert done.returncode == 2
    assert b"--max-header-block" in done.stderr
