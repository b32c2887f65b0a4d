"""The Debian package that `cpack` makes in build/release.

Build it with:
  cmake --preset release && cmake --build --preset release && (cd build/release && cpack)

The package's metadata, file list and file contents are checked with dpkg-deb. One test also
installs it on this machine with dpkg -i and purges it again. That test runs only as root and
only when no taser package, no /usr/bin/taser and no taser user exist yet, so that it changes
nothing that it did not create.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from conftest import PACKAGING_DIR, deb_path

DEB = deb_path()

pytestmark = pytest.mark.skipif(
    DEB is None or not DEB.exists(),
    reason="no build/release/taser_*.deb: run cmake --preset release && "
    "cmake --build --preset release && (cd build/release && cpack)",
)

EXPECTED_FILES = {
    "./usr/bin/taser",
    "./lib/systemd/system/taser-bridge.service",
    "./etc/default/taser-bridge",
    "./usr/share/man/man1/taser.1.gz",
    "./usr/share/doc/taser/copyright",
}
MAINTAINER_SCRIPTS = ("postinst", "prerm", "postrm")


def dpkg_deb(*args: str) -> str:
    return subprocess.run(
        ["dpkg-deb", *args], check=True, capture_output=True, text=True, timeout=60
    ).stdout


def field(name: str) -> str:
    return dpkg_deb("--field", str(DEB), name).strip()


@pytest.fixture(scope="module")
def extracted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("deb")
    subprocess.run(["dpkg-deb", "--extract", str(DEB), str(root)], check=True, timeout=60)
    return root


@pytest.fixture(scope="module")
def control(tmp_path_factory) -> Path:
    control_dir = tmp_path_factory.mktemp("control") / "DEBIAN"
    subprocess.run(["dpkg-deb", "--control", str(DEB), str(control_dir)], check=True, timeout=60)
    return control_dir


def test_deb_file_name():
    assert DEB.name == f"taser_{field('Version')}_amd64.deb"


def test_deb_fields(extracted):
    assert field("Package") == "taser"
    assert field("Architecture") == "amd64"
    assert field("Section") == "net"
    depends = [d.strip().split(" ")[0] for d in field("Depends").split(",")]
    assert "adduser" in depends
    # scripts/check packages the static executable, which needs no shared library; a package
    # of the dynamic release build must depend on the libraries it links.
    dynamic = "(NEEDED)" in subprocess.run(
        ["readelf", "--dynamic", str(extracted / "usr/bin/taser")],
        capture_output=True, text=True, timeout=60).stdout
    if dynamic:
        assert "libssl3" in depends
        assert "libc6" in depends


def test_deb_file_list():
    listing = dpkg_deb("--contents", str(DEB))
    files = {line.split()[-1] for line in listing.splitlines() if not line.startswith("d")}
    assert files == EXPECTED_FILES


def test_deb_files_match_repository(extracted):
    unit = extracted / "lib/systemd/system/taser-bridge.service"
    env_file = extracted / "etc/default/taser-bridge"
    assert unit.read_text() == (PACKAGING_DIR / "systemd/taser-bridge.service").read_text()
    assert env_file.read_text() == (PACKAGING_DIR / "systemd/taser-bridge.env").read_text()


def test_deb_binary_runs(extracted):
    result = subprocess.run(
        [str(extracted / "usr/bin/taser"), "version"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == field("Version")


def test_deb_conffiles(control):
    assert (control / "conffiles").read_text().split() == ["/etc/default/taser-bridge"]


@pytest.mark.parametrize("script", MAINTAINER_SCRIPTS)
def test_deb_maintainer_script_mode(control, script):
    assert (control / script).stat().st_mode & 0o777 == 0o755


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
@pytest.mark.parametrize("script", MAINTAINER_SCRIPTS)
def test_deb_maintainer_script_shellcheck(control, script):
    result = subprocess.run(
        ["shellcheck", "--shell=sh", str(control / script)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout


@pytest.mark.skipif(shutil.which("man") is None, reason="man is not installed")
def test_deb_man_page_renders(extracted):
    result = subprocess.run(
        ["man", "--warnings", "-l", str(extracted / "usr/share/man/man1/taser.1.gz")],
        capture_output=True, text=True, timeout=60,
        env=dict(os.environ, MANWIDTH="80", MANPAGER="cat", PAGER="cat"),
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "--broker-address" in result.stdout
    assert "--bridge-listen" in result.stdout


def user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def package_installed(name: str) -> bool:
    result = subprocess.run(
        ["dpkg-query", "--show", "--showformat=${Status}", name],
        capture_output=True, text=True, timeout=30,
    )
    return result.returncode == 0 and "installed" in result.stdout


def host_install_blocker() -> str | None:
    """Return why installing on this machine is not safe, or None when it is."""
    if os.geteuid() != 0:
        return "dpkg -i needs root"
    if shutil.which("dpkg") is None:
        return "dpkg is not installed"
    if package_installed("taser"):
        return "a taser package is already installed"
    if Path("/usr/bin/taser").exists():
        return "/usr/bin/taser already exists"
    if user_exists("taser"):
        return "a taser user already exists"
    for dependency in field("Depends").split(","):
        name = dependency.strip().split(" ")[0]
        if not package_installed(name):
            return f"dependency {name} is not installed"
    return None


def test_deb_install_and_purge():
    blocker = host_install_blocker()
    if blocker:
        pytest.skip(f"not installing on this machine: {blocker}")
    etc_taser_existed = Path("/etc/taser").exists()
    try:
        install = subprocess.run(
            ["dpkg", "--install", str(DEB)], capture_output=True, text=True, timeout=120
        )
        assert install.returncode == 0, install.stdout + install.stderr

        user = pwd.getpwnam("taser")
        assert user.pw_uid < 1000
        assert user.pw_dir == "/nonexistent"
        assert user.pw_shell.endswith("nologin")
        assert grp.getgrgid(user.pw_gid).gr_name == "taser"
        assert Path("/etc/taser").is_dir()

        version = subprocess.run(
            ["/usr/bin/taser", "version"], capture_output=True, text=True, timeout=30
        )
        assert version.returncode == 0, version.stderr

        conffiles = subprocess.run(
            ["dpkg-query", "--show", "--showformat=${Conffiles}", "taser"],
            capture_output=True, text=True, timeout=30,
        ).stdout
        assert "/etc/default/taser-bridge" in conffiles

        if shutil.which("systemd-analyze"):
            verify = subprocess.run(
                ["systemd-analyze", "verify", "/lib/systemd/system/taser-bridge.service"],
                capture_output=True, text=True, timeout=60,
            )
            assert verify.returncode == 0, verify.stderr
            assert verify.stderr == ""
    finally:
        purge = subprocess.run(
            ["dpkg", "--purge", "taser"], capture_output=True, text=True, timeout=120
        )
        if user_exists("taser"):
            subprocess.run(["deluser", "--system", "taser"], capture_output=True, timeout=60)
        if not etc_taser_existed and Path("/etc/taser").is_dir():
            Path("/etc/taser").rmdir()
    assert purge.returncode == 0, purge.stdout + purge.stderr
    assert not Path("/usr/bin/taser").exists()
    assert not Path("/etc/default/taser-bridge").exists()
    assert not Path("/lib/systemd/system/taser-bridge.service").exists()
