"""Docker mode of the profiler: the organizers' command, the container's memory and overhead.

- :func:`docker_argv` is the organizers' ``docker container run`` line as an argv, with
  ``--gpus`` only where there is a GPU to give (a daemon without the NVIDIA runtime refuses
  ``--gpus`` outright, so on a CPU host every case would fail) and with extra client options
  placed before the image.
- :class:`ContainerMemory` reads the container's memory from its cgroup: the profiler's own
  process tree holds only the docker client (a few tens of MB), while the predictor runs in
  a process tree that the daemon starts. The container is found by the id that
  ``docker run --cidfile`` writes; the kernel's counters are read every tick: the current
  usage (for the memory-time area) and the kernel's own peak (``memory.max_usage_in_bytes``
  on cgroup v1, ``memory.peak`` on v2), which catches a spike between two ticks.
- :func:`predictor_time_s` reads the time the predictor reports for itself from its log, so
  that the container's overhead (wall time of the docker command minus that) is known per
  case.

The cgroup figures count what the kernel charges to the container, as the ``-m 28G`` limit
does: anonymous memory plus the page cache of files it read or wrote (the input image and the
mask; the model and libraries when not cached already).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

#: The command the organizers run inside the container.
CONTAINER_COMMAND = "sh predict.sh"
#: Memory limit the organizers give the container.
CONTAINER_MEMORY = "28G"
#: Where cgroup file systems are mounted.
CGROUP_ROOT = Path("/sys/fs/cgroup")
#: The predictor's last log line: ``done: 1/1 case(s) written to OUT in 4.2 s``.
DONE_LINE = re.compile(r"^done: \d+/\d+ case\(s\) written to .* in (\d+(?:\.\d+)?) s", re.M)


def docker_argv(
    image: str,
    input_dir: Path,
    output_dir: Path,
    name: str,
    gpu_index: int | None = 0,
    options: Sequence[str] = (),
) -> list[str]:
    """The organizers' command line, as the argv the shell would make of it.

    ``docker container run --gpus "device=0" -m 28G --name TEAM --rm
    -v $IN/:/workspace/inputs/ -v $OUT/:/workspace/outputs/ IMAGE /bin/bash -c "sh predict.sh"``

    Args:
        image: the team's image, e.g. ``team:latest``.
        input_dir: host folder mounted as ``/workspace/inputs/``; must be absolute (Docker
            takes a relative ``-v`` source for a named volume).
        output_dir: host folder mounted as ``/workspace/outputs/``, absolute.
        name: container name (the organizers use the team name).
        gpu_index: the device exposed to the container; None leaves ``--gpus`` out (a host
            without a GPU).
        options: further ``docker container run`` options, placed just before the image
            (e.g. ``--network none`` where the daemon has no bridge network).
    """
    gpus = ["--gpus", f"device={gpu_index}"] if gpu_index is not None else []
    return [
        "docker", "container", "run",
        *gpus,
        "-m", CONTAINER_MEMORY,
        "--name", name,
        "--rm",
        "-v", f"{input_dir}/:/workspace/inputs/",
        "-v", f"{output_dir}/:/workspace/outputs/",
        *options,
        image,
        "/bin/bash", "-c", CONTAINER_COMMAND,
    ]  # fmt: skip


def container_name_for(image: str) -> str:
    """A container name from an image reference: ``registry/org/team:v1`` -> ``team``."""
    last = image.rsplit("/", 1)[-1]
    return last.split("@", 1)[0].split(":", 1)[0] or "profiling"


def kill_container(name: str, docker: str = "docker") -> None:
    """Kill a running container by name; errors are ignored (it may be gone already).

    Killing the docker client leaves the container running; ``--rm`` removes it once dead.
    """
    if shutil.which(docker) is None:
        return
    subprocess.run(
        [docker, "container", "kill", name],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )


def cgroup_dirs(container_id: str, root: Path = CGROUP_ROOT) -> list[Path]:
    """Where a container's memory cgroup can be, by cgroup version and Docker's cgroup driver."""
    return [
        root / "memory" / "docker" / container_id,  # v1, cgroupfs driver
        root / "memory" / "system.slice" / f"docker-{container_id}.scope",  # v1, systemd
        root / "system.slice" / f"docker-{container_id}.scope",  # v2, systemd driver
        root / "docker" / container_id,  # v2, cgroupfs driver
    ]


@dataclass(frozen=True)
class ContainerReading:
    """One read of a container's memory cgroup.

    Attributes:
        usage_mb: memory charged to the container now.
        peak_mb: the kernel's high-water mark since the container started; None where the
            kernel does not keep one (cgroup v2 before Linux 5.19).
    """

    usage_mb: float
    peak_mb: float | None


class ContainerMemory:
    """Reads the memory cgroup of the container whose id ``docker run --cidfile`` writes.

    Until the client has created the container (and after ``--rm`` has removed it) a read
    returns None.
    """

    def __init__(self, cidfile: Path, root: Path = CGROUP_ROOT) -> None:
        """Args: cidfile: the ``--cidfile`` path; root: where cgroups are mounted."""
        self.cidfile = cidfile
        self.root = root
        self._dir: Path | None = None
        self._usage_file = self._peak_file = ""
        self.container_id: str | None = None

    def _find(self) -> Path | None:
        try:
            cid = self.cidfile.read_text().strip()
        except OSError:
            return None
        if not re.fullmatch(r"[0-9a-f]{64}", cid):
            return None  # not written yet, or written partly
        self.container_id = cid
        for folder in cgroup_dirs(cid, self.root):
            if (folder / "memory.usage_in_bytes").is_file():
                self._usage_file, self._peak_file = (
                    "memory.usage_in_bytes",
                    "memory.max_usage_in_bytes",
                )
                return folder
            if (folder / "memory.current").is_file():
                self._usage_file, self._peak_file = "memory.current", "memory.peak"
                return folder
        return None

    def read(self) -> ContainerReading | None:
        """The container's memory now, or None while it does not exist (or is not found)."""
        if self._dir is None:
            self._dir = self._find()
            if self._dir is None:
                return None
        try:
            usage = int((self._dir / self._usage_file).read_text())
        except (OSError, ValueError):
            return None
        try:
            peak: int | None = int((self._dir / self._peak_file).read_text())
        except (OSError, ValueError):
            peak = None
        return ContainerReading(usage / 2**20, None if peak is None else peak / 2**20)


def predictor_time_s(log_text: str) -> float | None:
    """The time the predictor reports for itself: the last ``done: ... in X s`` line.

    The predictor measures from just after its start-up imports (argparse, SimpleITK) to
    its last written mask; the rest of the command's wall time (container creation, bash,
    the interpreter's start, tear-down) is the overhead of running it.
    """
    found = DONE_LINE.findall(log_text)
    return float(found[-1]) if found else None
