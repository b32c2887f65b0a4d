"""packaging/container/Containerfile: the final image contains the static executable only.

The build stage starts FROM debian:12, which cannot be pulled without a registry, so these
tests check the Containerfile's text, and, where podman is installed, build the final stage
alone from the locally built static executable and inspect the image's files and config.
"""

from __future__ import annotations

import io
import json
import re
import shlex
import shutil
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import PACKAGING_DIR, static_binary_path

CONTAINERFILE = PACKAGING_DIR / "container" / "Containerfile"
IMAGE_TAG = "localhost/taser-packaging-test:final-stage"


@dataclass
class Instruction:
    keyword: str
    arguments: str


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_containerfile(text: str) -> list[Stage]:
    """Split a Containerfile into stages of instructions, joining continued lines."""
    logical_lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical_lines.append(pending + stripped)
        pending = ""
    assert not pending, "Containerfile ends with a line continuation"

    stages: list[Stage] = []
    for line in logical_lines:
        keyword, _, arguments = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", arguments, re.I)
            assert match, f"unparsed FROM line: {line}"
            stages.append(Stage(base=match.group(1), name=match.group(2)))
        else:
            assert stages, f"instruction before the first FROM: {line}"
            stages[-1].instructions.append(Instruction(keyword, arguments.strip()))
    return stages


def copy_arguments(instruction: Instruction) -> tuple[dict[str, str], list[str]]:
    """Return the --flags and the paths of a COPY instruction."""
    flags: dict[str, str] = {}
    paths: list[str] = []
    for word in shlex.split(instruction.arguments):
        if word.startswith("--"):
            name, _, value = word[2:].partition("=")
            flags[name] = value
        else:
            paths.append(word)
    return flags, paths


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_containerfile(CONTAINERFILE.read_text())


@pytest.fixture(scope="module")
def final_stage(stages) -> Stage:
    return stages[-1]


def test_containerfile_has_two_stages(stages):
    assert len(stages) == 2
    assert stages[0].base == "docker.io/library/debian:12"
    assert stages[0].name == "build"


def test_final_stage_from_scratch(final_stage):
    assert final_stage.base == "scratch"


def test_final_stage_copies_only_binary(final_stage, stages):
    copies = final_stage.all("COPY")
    assert len(copies) == 1
    flags, paths = copy_arguments(copies[0])
    assert flags == {"from": stages[0].name}
    assert paths == ["/out/taser", "/taser"]
    assert final_stage.all("ADD") == []
    assert final_stage.all("RUN") == []


def test_build_stage_makes_copied_binary(stages):
    runs = [i.arguments for i in stages[0].all("RUN")]
    assert "packaging/static/build /out/taser" in runs


def test_final_stage_user_numeric_nonroot(final_stage):
    users = final_stage.all("USER")
    assert len(users) == 1
    match = re.fullmatch(r"(\d+):(\d+)", users[0].arguments)
    assert match, f"USER must be numeric UID:GID, got {users[0].arguments!r}"
    assert int(match.group(1)) != 0
    assert int(match.group(2)) != 0


def test_final_stage_entrypoint_and_cmd(final_stage):
    entrypoints = final_stage.all("ENTRYPOINT")
    commands = final_stage.all("CMD")
    assert len(entrypoints) == 1
    assert len(commands) == 1
    assert json.loads(entrypoints[0].arguments) == ["/taser"]
    assert json.loads(commands[0].arguments) == ["broker"]


def test_final_stage_exposes_service_ports(final_stage):
    exposed = " ".join(i.arguments for i in final_stage.all("EXPOSE")).split()
    assert sorted(exposed) == ["8443", "8444", "9090"]


def final_stage_only(final_stage: Stage) -> str:
    """Return the final stage as a Containerfile that copies taser from the build context."""
    lines = [f"FROM {final_stage.base}"]
    for instruction in final_stage.instructions:
        if instruction.keyword == "COPY":
            _, paths = copy_arguments(instruction)
            lines.append(f"COPY taser {paths[-1]}")
        else:
            lines.append(f"{instruction.keyword} {instruction.arguments}")
    return "\n".join(lines) + "\n"


def podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["podman", *args], check=True, capture_output=True, text=False, timeout=timeout
    )


@pytest.mark.skipif(shutil.which("podman") is None, reason="podman is not installed")
@pytest.mark.skipif(
    not static_binary_path().exists(),
    reason=f"no static build at {static_binary_path()}: run packaging/static/build",
)
def test_final_image_contains_only_binary(final_stage, tmp_path):
    context = tmp_path / "context"
    context.mkdir()
    shutil.copy2(static_binary_path(), context / "taser")
    (context / "Containerfile").write_text(final_stage_only(final_stage))

    podman("build", "--pull=never", "--network=none", "--quiet", "-t", IMAGE_TAG, str(context))
    try:
        config = json.loads(podman("image", "inspect", IMAGE_TAG).stdout)[0]["Config"]
        archive = podman("save", "--format", "docker-archive", IMAGE_TAG).stdout
    finally:
        podman("rmi", IMAGE_TAG)

    assert config["User"] == "65532:65532"
    assert config["Entrypoint"] == ["/taser"]
    assert config["Cmd"] == ["broker"]

    files: list[str] = []
    with tarfile.open(fileobj=io.BytesIO(archive)) as image:
        manifest = json.load(image.extractfile("manifest.json"))
        for layer_name in manifest[0]["Layers"]:
            layer_bytes = image.extractfile(layer_name).read()
            with tarfile.open(fileobj=io.BytesIO(layer_bytes)) as layer:
                files += [m.name for m in layer.getmembers() if not m.isdir()]
    assert files == ["taser"]
