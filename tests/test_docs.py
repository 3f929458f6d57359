"""The commands the README and docs/ show run as written: every `birdflow` line of their shell blocks is one the
command line accepts, and the ones that only read or set up a station folder are run, in a fresh one."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from birdflow.app.cli import build_parser
from tests.conftest import PROJECT

DOCUMENTS = [PROJECT / "README.md", *sorted((PROJECT / "docs").glob("*.md"))]
# what runs against a station folder without a server, a network or a listener
SAFE = {"init", "listeners", "detections", "sql", "export", "review"}
NEEDS_A_SERVER = {"--influx", "revoke"}
NEEDS_A_DETECTION = {"confirm", "reject", "relabel", "import"}  # a review verdict names one by its id
BIRDFLOW = Path(sys.executable).parent / "birdflow"
# a station whose place is set, as a Darwin Core export needs
WITH_COORDINATES = {**os.environ, "LATITUDE": "45.52", "LONGITUDE": "-122.68", "COUNTRY_CODE": "US", "STATE_CODE": "OR"}


def shell_lines(document: Path) -> list[str]:
    """The command lines of a document's ```bash blocks, continuations joined, comments dropped."""
    lines, language, pending = [], None, ""
    for line in document.read_text().splitlines():
        if line.startswith("```"):
            language = None if language is not None else (line[3:].strip() or "text")
            continue
        if language not in ("bash", "sh"):
            continue
        pending += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            lines.append(pending.strip())
            pending = ""
    return [line for line in lines if line]


def birdflow_commands(line: str) -> list[list[str]]:
    """The birdflow invocations of one line (`a && b` is two), as argument lists without the program."""
    found = []
    for part in re.split(r"&&|;|\|", line):
        words = shlex.split(part, comments=True)
        if ">" in words:  # what follows is where the output goes
            words = words[: words.index(">")]
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):  # VAR=value before the command
            words.pop(0)
        if words and Path(words[0]).name == "birdflow":
            found.append(words[1:])
    return found


DOCUMENTED = [
    (document.relative_to(PROJECT).as_posix(), line, arguments)
    for document in DOCUMENTS
    for line in shell_lines(document)
    for arguments in birdflow_commands(line)
]


def test_the_docs_show_commands_of_every_kind():
    """The extraction finds what the documents hold (a change to their format would otherwise test nothing)."""
    kinds = {arguments[0] for _, _, arguments in DOCUMENTED}
    assert {"init", "listen", "detections", "sql", "listeners", "backfill", "worker", "bench"} <= kinds, kinds
    assert {document for document, _, _ in DOCUMENTED} >= {"README.md", "docs/security.md", "docs/fleet.md"}


@pytest.mark.parametrize(("document", "line", "arguments"), DOCUMENTED, ids=[line for _, line, _ in DOCUMENTED])
def test_a_documented_command_is_one_the_command_line_takes(document, line, arguments, capsys):
    try:
        build_parser().parse_args(arguments)
    except SystemExit as exc:
        pytest.fail(f"{document}: `{line}` is refused: {capsys.readouterr().err.strip()} (exit {exc.code})")


def test_the_safe_documented_commands_run_as_written_in_a_new_station(tmp_path):
    subprocess.run([str(BIRDFLOW), "init", "--station", "docs01"], cwd=tmp_path, check=True, capture_output=True)
    ran = []
    for document, line, arguments in DOCUMENTED:
        if arguments[0] not in SAFE or (NEEDS_A_SERVER | NEEDS_A_DETECTION) & set(arguments):
            continue
        result = subprocess.run(
            [str(BIRDFLOW), *arguments], cwd=tmp_path, env=WITH_COORDINATES, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, f"{document}: `{line}` exited {result.returncode}:\n{result.stderr[-2000:]}"
        ran.append(arguments[0])
    assert {"init", "listeners", "detections", "sql", "export", "review"} <= set(ran), ran


def first_station_lines() -> list[str]:
    """The command lines of the README's "A first station" block, as a reader types them."""
    readme = (PROJECT / "README.md").read_text()
    section = readme.split("## A first station", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip()]


@pytest.mark.e2e
def test_the_readmes_first_station_reaches_a_detection_with_the_token_init_turned_on(tmp_path, sample_48k):
    """Run as written, in a new folder beside ../shared as a checkout is, each line in order (`up` in a terminal of
    its own); only the ports are the test's, in the environment, which the settings let win."""
    import httpx

    from birdflow_tools.testbed import free_port, stop_process, wait_until

    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / ".venv").symlink_to(PROJECT / ".venv")
    (tmp_path / "shared").symlink_to(sample_48k.parent.parent)
    ports = {name: str(free_port()) for name in ("INGEST_PORT", "PREFECT_PORT", "HEALTH_PORT", "POSTGRES_PORT")}
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PREFECT_", "BIRDFLOW_"))}
    env.update(ports)
    lines = first_station_lines()
    assert [line.split()[1] for line in lines if "birdflow" in line] == [
        "init", "listeners", "up", "listen", "detections"
    ]  # fmt: skip
    folder, up, said = checkout, None, {}
    try:
        for line in lines:
            if line.startswith("cd "):
                folder = folder / line.removeprefix("cd ").strip()
                continue
            if line.split()[1] == "up":
                up = subprocess.Popen(line, shell=True, cwd=folder, env=env, start_new_session=True,
                                      stdout=open(tmp_path / "up.log", "wb"), stderr=subprocess.STDOUT)  # fmt: skip
                wait_until(lambda: "executor ready" in (tmp_path / "up.log").read_text(), 180, "the station")
                # the lock init turned on: without its token, the same listener is refused, in the station's words
                refused = subprocess.run(
                    [str(BIRDFLOW), "listen", "--file", str(sample_48k), "--prefix", "mic", "--recordings", "1"],
                    cwd=folder, env=env, capture_output=True, text=True, timeout=120,
                )  # fmt: skip
                assert "mic01: 401: missing or invalid token for listener 'mic01'" in refused.stdout, refused.stdout
                continue
            if line.split()[1] == "detections":
                wait_until(
                    lambda line=line, folder=folder: "American Goldfinch" in run_line(line, folder, env).stdout,
                    120,
                    "a detection",
                )
            said[line.split()[1]] = run_line(line, folder, env)
        # the UI's lock: its API answers only with the login init wrote
        ui = f"http://127.0.0.1:{ports['PREFECT_PORT']}/api/flow_runs/count"
        assert httpx.post(ui, timeout=10).status_code == 401
    finally:
        if up is not None:
            stop_process(up, grace_s=30)
    assert "sent 1 recording(s) from 1 listener(s); 0 error(s)" in said["listen"].stdout
    secrets = (checkout / "station" / ".env").read_text()
    assert "INGEST_AUTH=on" in secrets and "\nPREFECT_API_AUTH_STRING=birdflow:" in secrets


def run_line(line: str, folder: Path, env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run(line, shell=True, cwd=folder, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"`{line}` exited {done.returncode}:\n{done.stdout[-1500:]}{done.stderr[-1500:]}"
    return done


def test_the_listener_protocols_worked_example_is_what_the_station_reads():
    """The bytes docs/listener-protocol.md gives firmware writers, through the station's own frame and WAV parsers."""
    import struct

    from birdflow.core.wav import parse_header
    from birdflow.ingest_api.framing import FrameParser

    text = (PROJECT / "docs" / "listener-protocol.md").read_text()
    example = re.search(r"```text\n(frame 0.*?)```", text, re.DOTALL)
    assert example, "no worked example in docs/listener-protocol.md"
    frames = re.split(r"^frame \d+", example.group(1), flags=re.MULTILINE)[1:]
    first, second = (bytes.fromhex(" ".join(block.split())) for block in frames)
    [frame] = FrameParser(max_payload=1 << 20).feed(first)
    header = parse_header(frame.payload)
    assert (frame.seq, len(frame.payload), header.size) == (0, 44, 44)
    assert (header.format.sample_rate, header.format.channels, header.format.bits_per_sample) == (48000, 1, 16)
    parser = FrameParser(max_payload=1 << 20)
    assert list(parser.feed(second)) == []  # the page's other 32 760 bytes are still to come
    assert parser.pending_bytes == len(second)
    seq, length = int.from_bytes(second[:3], "little"), int.from_bytes(second[3:6], "little")
    assert (seq, length) == (1, 32768) and struct.unpack("<4h", second[6:]) == (0, 1200, -1200, 32767)


def test_every_test_the_security_table_names_exists():
    """docs/security.md's "before and after" rows each name the test that holds them: a renamed test breaks this."""
    table = (PROJECT / "docs" / "security.md").read_text().partition("## What the probes found")[2]
    named, current_file = [], None
    for file, name in re.findall(r"`(?:([\w/]+\.py))?::(test_\w+)`", table):
        current_file = file or current_file  # `::test_x` names another test of the file named before it
        named.append((current_file, name))
    assert len(named) >= 30
    missing = [
        f"{file}::{name}"
        for file, name in named
        if not re.search(rf"^def {name}\(", (PROJECT / "tests" / file).read_text(), re.MULTILINE)
    ]
    assert missing == []
