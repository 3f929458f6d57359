"""The station's image (docker/Dockerfile) built and run on a machine without a Docker daemon or a registry:
rootful podman told to use runc and cgroupfs, a stand-in for `python:3.11-slim-bookworm` made with Debian's
debootstrap, and the host's pip configuration and CA certificates lent to the build so that pip reaches the
package index as the host does. For the container tests and `birdflow image`.
"""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]
DOCKERFILE = PROJECT / "docker" / "Dockerfile"
OFFICIAL_BASE = "python:3.11-slim-bookworm"
ARCHES = {"amd64": "x86_64", "arm64": "aarch64"}
CONTAINERS_CONF = """\
[containers]
default_ulimits = []

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
"""
BASE_PACKAGES = "python3.11,python3.11-venv,python3-pip,python-is-python3,ca-certificates"
# what Debian's slim images leave out of every package (their dpkg path excludes), so that the stand-in
# base is close in size to the official one
SLIM_DPKG_EXCLUDES = """\
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
"""
# lent to every RUN of the build (never stored in the image): pip's configuration and the CA bundle
HOST_BUILD_FILES = ("/etc/pip.conf", "/etc/xdg/pip", "/etc/ssl/certs/ca-certificates.crt")
# podman build needs an explicit open-file limit, at most the host's own
BUILD_OPEN_FILES = min(65536, resource.getrlimit(resource.RLIMIT_NOFILE)[1])


def base_image(arch: str) -> str:
    """The stand-in base's name: the official name for this machine's architecture, a suffixed one for another."""
    return OFFICIAL_BASE if ARCHES[arch] == platform.machine() else f"{OFFICIAL_BASE}-{arch}"


def podman_problem() -> str | None:
    """Why containers cannot run here, or None."""
    if not shutil.which("podman") or not shutil.which("runc"):
        return "podman and runc are not installed (Debian: apt install podman runc)"
    if os.geteuid() != 0:
        return "the container tests need rootful podman (run as root)"
    return None


def emulation_problem(arch: str) -> str | None:
    """Why `arch` binaries cannot run here, or None (foreign ones run through qemu-user's binfmt_misc handler)."""
    if ARCHES[arch] == platform.machine():
        return None
    handler = Path(f"/proc/sys/fs/binfmt_misc/qemu-{ARCHES[arch]}")
    if not handler.exists():
        return (
            f"no binfmt_misc handler for {arch} (Debian: apt install qemu-user-static binfmt-support; "
            f"mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc; update-binfmts --enable qemu-{ARCHES[arch]})"
        )
    return None if handler.read_text().startswith("enabled") else f"the binfmt_misc handler for {arch} is disabled"


def debian_mirror() -> str:
    """The Debian mirror this machine's apt uses (deb822 or one-line sources), else Debian's own."""
    sources = Path("/etc/apt/sources.list.d")
    texts = [path.read_text() for path in sorted(sources.glob("*.sources"))] if sources.is_dir() else []
    for text in texts:
        for stanza in text.split("\n\n"):
            if re.search(r"^Suites:.*\bbookworm\b", stanza, re.MULTILINE) and (
                found := re.search(r"^URIs:\s*(\S+)", stanza, re.MULTILINE)
            ):
                return found.group(1)
    listed = Path("/etc/apt/sources.list")
    if listed.is_file() and (found := re.search(r"^deb\s+(\S+)\s+bookworm\s", listed.read_text(), re.MULTILINE)):
        return found.group(1)
    return "http://deb.debian.org/debian"


@dataclass
class Podman:
    """podman with a containers.conf of its own (CONTAINERS_CONF); everything it runs is bounded in time."""

    folder: Path

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "containers.conf").write_text(CONTAINERS_CONF)

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "CONTAINERS_CONF": str(self.folder / "containers.conf")}

    def __call__(
        self, *args: str, timeout_s: float = 120, check: bool = True, **options
    ) -> subprocess.CompletedProcess:
        done = subprocess.run(
            ["podman", *args], env=self.env, capture_output=True, text=True, timeout=timeout_s, **options
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"podman {' '.join(args[:3])} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        return done

    def exists(self, image: str) -> bool:
        return self("image", "exists", image, check=False).returncode == 0

    def size_bytes(self, image: str) -> int:
        return int(self("image", "inspect", "--format", "{{.Size}}", image).stdout.strip())

    def layers(self, image: str) -> list[tuple[int, str]]:
        """(bytes, the instruction that made it) per layer, oldest first."""
        history = json.loads(self("history", "--no-trunc", "--format", "json", image).stdout)
        return [(int(layer["size"]), layer["CreatedBy"]) for layer in reversed(history)]


def make_base(podman: Podman, arch: str, say: Callable[[str], None] = print) -> float:
    """The stand-in base image for `arch` (debootstrap, minbase, Debian's slim excludes), unless it exists;
    returns the seconds it took."""
    name = base_image(arch)
    if podman.exists(name):
        return 0.0
    if not shutil.which("debootstrap"):
        raise RuntimeError(f"no image {name} here and no debootstrap to make one (Debian: apt install debootstrap)")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="birdflow-base-") as scratch:
        root = Path(scratch) / "root"
        say(f"debootstrap of a bookworm base for {arch} (minutes under emulation)")
        done = subprocess.run(
            [
                "debootstrap",
                f"--arch={arch}",
                "--variant=minbase",
                f"--include={BASE_PACKAGES}",
                "bookworm",
                str(root),
                debian_mirror(),
            ],
            capture_output=True,
            text=True,
            timeout=3600,
        )
        if done.returncode != 0:
            raise RuntimeError(f"debootstrap failed: {(done.stdout + done.stderr).strip()[-2000:]}")
        _slim(root)
        with subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE) as tar:
            podman("import", "--arch", arch, "-", name, stdin=tar.stdout, timeout_s=600)
    return time.monotonic() - started


def _slim(root: Path) -> None:
    """What Debian's slim images do: no documentation, manuals or translations, no apt caches kept."""
    (root / "etc/dpkg/dpkg.cfg.d/docker").write_text(SLIM_DPKG_EXCLUDES)
    (root / "etc/apt/apt.conf.d/docker-clean").write_text(
        'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };\n'
        'Dir::Cache::pkgcache ""; Dir::Cache::srcpkgcache "";\n'
    )
    for pattern in (
        "usr/share/doc/*/*",
        "usr/share/man/*",
        "usr/share/info/*",
        "usr/share/locale/*",
        "var/cache/apt/archives/*.deb",
        "var/cache/apt/*.bin",
        "var/lib/apt/lists/*",
    ):
        for path in root.glob(pattern):
            if path.name == "copyright":
                continue
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def build(podman: Podman, tag: str, arch: str, backend: str = "ai-edge-litert") -> float:
    """docker/Dockerfile built as `tag` for `arch` on the stand-in base; returns the seconds it took.

    Its build stage is tagged too (`<tag>-build`), so that the next build reuses its dependency layer (a code
    change then builds in ~40 s instead of ~130), and what earlier builds left untagged is pruned: repeated
    builds keep one image and one build stage per tag, not ~870 MB more each."""
    lent = [f"--volume={path}:{path}:ro" for path in HOST_BUILD_FILES if os.path.exists(path)]
    options = [
        "--format",
        "docker",
        "--pull=never",
        f"--platform=linux/{arch}",
        "--network=host",
        f"--ulimit=nofile={BUILD_OPEN_FILES}:{BUILD_OPEN_FILES}",
        *lent,
        f"--build-arg=BASE_IMAGE={base_image(arch)}",
        f"--build-arg=BIRDNET_BACKEND={backend}",
        "--file",
        str(DOCKERFILE),
    ]
    started = time.monotonic()
    podman("build", *options, "--target", "build", "--tag", f"{tag}-build", str(PROJECT), timeout_s=7200)
    podman("build", *options, "--tag", tag, str(PROJECT), timeout_s=7200)
    podman("image", "prune", "--force", "--filter", "label=io.birdflow.part-of=birdflow", timeout_s=600)
    return time.monotonic() - started


@dataclass
class Container:
    """A container of the image with a host folder as its data volume (/data), on the host's network."""

    podman: Podman
    image: str
    name: str
    data: Path
    env: dict[str, str]

    def run(self, *command: str) -> None:
        """Create and start it (detached) running `command` (the image's default: `up`)."""
        self.data.mkdir(parents=True, exist_ok=True)
        os.chown(self.data, 1000, 1000)  # the image's user
        variables = [f"--env={key}={value}" for key, value in self.env.items()]
        self.podman(
            "run",
            "--detach",
            f"--name={self.name}",
            "--ulimit=host",
            "--network=host",
            f"--volume={self.data}:/data",
            *variables,
            self.image,
            *command,
            timeout_s=120,
        )

    def once(self, *command: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
        """A one-off container of the image on the same volume and environment (`podman run --rm`)."""
        variables = [f"--env={key}={value}" for key, value in self.env.items()]
        return self.podman(
            "run",
            "--rm",
            "--ulimit=host",
            "--network=host",
            "--no-healthcheck",
            f"--volume={self.data}:/data",
            *variables,
            self.image,
            *command,
            timeout_s=timeout_s,
            check=False,
        )

    def exec(self, *command: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
        return self.podman("exec", self.name, *command, timeout_s=timeout_s, check=False)

    def healthy(self) -> bool:
        """The image's HEALTHCHECK, run now (podman schedules it through systemd, which is not here)."""
        return self.podman("healthcheck", "run", self.name, check=False, timeout_s=60).returncode == 0

    def state(self) -> dict:
        return json.loads(self.podman("inspect", "--format", "{{json .State}}", self.name).stdout)

    def stop(self, grace_s: int) -> float:
        """SIGTERM, then SIGKILL after grace_s; returns the seconds it took to stop."""
        started = time.monotonic()
        self.podman("stop", f"--time={grace_s}", self.name, timeout_s=grace_s + 60)
        return time.monotonic() - started

    def start(self) -> None:
        self.podman("start", self.name)

    def logs(self) -> str:
        done = self.podman("logs", self.name, check=False)
        return done.stdout + done.stderr

    def remove(self) -> None:
        self.podman("rm", "--force", "--time=0", self.name, check=False)


def layer_groups(podman: Podman, image: str) -> dict[str, int]:
    """The image's bytes by what they are: the base, the virtualenv, the rest (user, entrypoint, flows)."""
    base_layers = len(podman.layers(base_image_of(podman, image)))
    groups = {"base": 0, "virtualenv": 0, "rest": 0}
    for number, (size, made_by) in enumerate(podman.layers(image)):
        group = "base" if number < base_layers else "virtualenv" if "/opt/venv" in made_by else "rest"
        groups[group] += size
    return groups


def base_image_of(podman: Podman, image: str) -> str:
    labels = podman("image", "inspect", "--format", "{{.Architecture}}", image).stdout.strip()
    return base_image(labels)


def build_and_try(
    scratch: Path,
    arch: str,
    backend: str,
    tag: str,
    recording: Path | None,
    say: Callable[[str], None] = print,
) -> dict:
    """The stand-in base (if missing), the image, its size by layer group; with `recording`, a station started
    in the image and the recording pushed through it."""
    podman = Podman(scratch / "podman")
    results: dict = {"arch": arch, "backend": backend, "image": tag}
    results["base_seconds"] = round(make_base(podman, arch, say), 1)
    say(f"building {tag} for linux/{arch} (BirdNET on {backend})")
    results["build_seconds"] = round(build(podman, tag, arch, backend), 1)
    results["image_mb"] = round(podman.size_bytes(tag) / 1e6)
    results.update({f"{group}_mb": round(size / 1e6) for group, size in layer_groups(podman, tag).items()})
    if recording:
        results.update(try_recording(podman, tag, recording, scratch / "data", say))
    return results


def try_recording(podman: Podman, image: str, recording: Path, data: Path, say: Callable[[str], None]) -> dict:
    """`up` in the image on its defaults, one upload, the seconds each step took."""
    import httpx

    from birdflow_tools.testbed import free_port

    ports = {"INGEST_PORT": free_port(), "PREFECT_PORT": free_port(), "HEALTH_PORT": free_port()}
    container = Container(
        podman, image, f"birdflow-try-{os.getpid()}", data, {key: str(value) for key, value in ports.items()}
    )
    results: dict = {}
    try:
        started = time.monotonic()
        container.run()
        say("waiting for the station in the container to be healthy")
        while not container.healthy():
            if not container.state().get("Running") or time.monotonic() - started > 1800:
                raise RuntimeError(f"the station did not become healthy; its log ends:\n{container.logs()[-3000:]}")
            time.sleep(5)
        results["healthy_after_s"] = round(time.monotonic() - started, 1)
        uploaded = time.monotonic()
        response = httpx.post(
            f"http://127.0.0.1:{ports['INGEST_PORT']}/recordings_upload",
            files={"file": (f"mic1_20250601T053000Z{recording.suffix}", recording.read_bytes())},
            timeout=120,
        )
        response.raise_for_status()
        say("waiting for the recording to be analysed")
        while not (rows := detection_rows(container)):
            if time.monotonic() - uploaded > 1800:
                raise RuntimeError(f"the recording was not processed; the log ends:\n{container.logs()[-3000:]}")
            time.sleep(5)
        results["recording_processed_after_s"] = round(time.monotonic() - uploaded, 1)
        results["detections"] = len(rows)
        results["recording_analysed"] = True
    finally:
        container.remove()
    return results


def detection_rows(container: Container) -> list[dict]:
    """`birdflow detections --format json` inside the container (nothing while it fails or finds none)."""
    listed = container.exec("birdflow", "detections", "--format", "json")
    return json.loads(listed.stdout) if listed.returncode == 0 and listed.stdout.strip() else []
