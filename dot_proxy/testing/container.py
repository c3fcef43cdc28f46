"""The dot-proxy image built and run with podman, where no image registry may be in reach.

For ``nox -s container`` (deploy/container/test_container.py). What it takes on a fresh Debian
machine with no Docker engine and no image registry (``apt-get install podman runc
debootstrap``, as root):

- podman runs containers with runc and the cgroupfs manager (crun refuses hybrid cgroups:
  "cgroups in hybrid mode not supported"), and takes its rlimits from ``CONTAINERS_CONF``
  (runc cannot raise them without CAP_SYS_RESOURCE);
- the base image is ``DOT_PROXY_BASE_IMAGE`` if set, else the Dockerfile's default if it is
  already here (``podman pull`` it where a registry is in reach), else a Debian made with
  ``debootstrap --variant=minbase`` with python3, from the mirror apt already uses, and
  imported once (``podman import``): kept between runs, like every layer of the build;
- pip inside the build gets the host's package index settings and CA bundle, mounted
  read-only for the build only (the host's own pip.conf names files the build does not have).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

__all__ = [
    "LOCAL_BASE",
    "Podman",
    "base_image",
    "build_image",
    "pip_settings",
]

# What podman needs here; a CONTAINERS_CONF of the user's own wins.
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""
LOCAL_BASE = "localhost/dot-proxy-base"
DEBOOTSTRAP_PACKAGES = "python3,python3-venv,ca-certificates"
# Left out of the debootstrap base, as Debian's own slim images leave them out.
_SLIM = (
    "var/cache/apt",
    "var/lib/apt/lists",
    "usr/share/doc",
    "usr/share/man",
    "usr/share/locale",
)
# Where the build's pip settings appear inside the build containers (podman build --volume).
_PIP_CONF = "/etc/pip.conf"
_PIP_CA = "/run/dot-proxy-build/ca.pem"
_PIP_KEYS = frozenset(
    ("index-url", "extra-index-url", "trusted-host", "timeout", "default-timeout", "retries")
)


class ContainerError(Exception):
    """podman, debootstrap or the build failed; the message carries their output."""


@dataclass(frozen=True, slots=True)
class Podman:
    """podman with this module's settings: ``podman.run("ps")`` and so on."""

    environment: dict[str, str]

    @classmethod
    def configured(cls, workdir: Path) -> Podman:
        """podman with a ``CONTAINERS_CONF`` in ``workdir`` unless the caller has one."""
        environment = dict(os.environ)
        if "CONTAINERS_CONF" not in environment:
            conf = workdir / "containers.conf"
            conf.write_text(CONTAINERS_CONF)
            environment["CONTAINERS_CONF"] = str(conf)
        return cls(environment)

    def run(
        self, *args: str, check: bool = True, timeout: float = 600, stdin: IO[bytes] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``podman ARGS`` (reading ``stdin`` if given); raises :class:`ContainerError` on
        failure when ``check``."""
        result = subprocess.run(
            ["podman", *args],
            env=self.environment,
            stdin=stdin,
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise ContainerError(
                f"podman {' '.join(args)} exited {result.returncode}:\n{result.stderr[-4000:]}"
            )
        return result

    def import_tree(self, tree: Path, name: str) -> None:
        """``tar -C TREE -c . | podman import - NAME``: a directory tree as an image."""
        tar = subprocess.Popen(["tar", "-C", str(tree), "-c", "."], stdout=subprocess.PIPE)
        try:
            imported = self.run(
                "import", "--change", "CMD=/bin/sh", "-", name, check=False, stdin=tar.stdout
            )
        finally:
            if tar.stdout is not None:
                tar.stdout.close()
            tar.wait()
        if imported.returncode != 0 or tar.returncode != 0:
            raise ContainerError(f"podman import {name} failed:\n{imported.stderr[-4000:]}")

    def exists(self, image: str) -> bool:
        return self.run("image", "exists", image, check=False).returncode == 0

    def size(self, image: str) -> int:
        """The image's size in bytes, as ``podman images`` counts it (all its layers)."""
        return int(self.run("image", "inspect", "--format", "{{.Size}}", image).stdout)

    def inspect(self, what: str) -> dict[str, object]:
        found = json.loads(self.run("inspect", what).stdout)
        assert isinstance(found, list) and found, found
        first = found[0]
        assert isinstance(first, dict)
        return first


def dockerfile_default_base(dockerfile: Path) -> str:
    """The ``ARG BASE_IMAGE=`` default of the Dockerfile."""
    found = re.search(r"^ARG BASE_IMAGE=(\S+)", dockerfile.read_text(), re.MULTILINE)
    if found is None:
        raise ContainerError(f"{dockerfile} has no ARG BASE_IMAGE default")
    return found.group(1)


def base_image(podman: Podman, dockerfile: Path, workdir: Path) -> tuple[str, float | None]:
    """The base to build on, and the seconds it took to make it (``None``: it was there)."""
    chosen = os.environ.get("DOT_PROXY_BASE_IMAGE")
    if chosen:
        return chosen, None
    default = dockerfile_default_base(dockerfile)
    if podman.exists(default):
        return default, None
    mirror, suite = apt_mirror()
    local = f"{LOCAL_BASE}:{suite}"
    if podman.exists(local):
        return local, None
    started = time.monotonic()
    _debootstrap(podman, local, suite, mirror, workdir)
    return local, time.monotonic() - started


def apt_mirror(root: Path = Path("/")) -> tuple[str, str]:
    """The Debian mirror and suite apt uses here (deb822 sources or sources.list)."""
    suite = "bookworm"
    release = root / "etc/os-release"
    if release.exists():
        found = re.search(r"^VERSION_CODENAME=(\w+)", release.read_text(), re.MULTILINE)
        suite = found.group(1) if found else suite
    candidates = [
        root / "etc/apt/sources.list",
        *sorted((root / "etc/apt").glob("sources.list.d/*")),
    ]
    for path in candidates:
        if not path.is_file():
            continue
        text = path.read_text()
        for pattern in (r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+" + suite + r"\s", r"^URIs:\s*(\S+)"):
            for found in re.finditer(pattern, text, re.MULTILINE):
                if "/debian" in found.group(1) and "security" not in found.group(1):
                    return found.group(1), suite
    return "http://deb.debian.org/debian", suite


def _debootstrap(podman: Podman, name: str, suite: str, mirror: str, workdir: Path) -> None:
    if shutil.which("debootstrap") is None:
        raise ContainerError("debootstrap is not installed (apt-get install debootstrap)")
    rootfs = workdir / "rootfs"
    try:
        result = subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={DEBOOTSTRAP_PACKAGES}",
                suite,
                str(rootfs),
                mirror,
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=900,
        )
        if result.returncode != 0:
            raise ContainerError(f"debootstrap failed:\n{result.stdout[-3000:]}{result.stderr}")
        for relative in _SLIM:
            for entry in (rootfs / relative).glob("*"):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        podman.import_tree(rootfs, name)
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)


def pip_settings(workdir: Path, config: Sequence[str]) -> list[str]:
    """``podman build --volume`` arguments that give pip the host's index settings.

    ``config`` is ``pip config list``'s output (``scope.key='value'`` lines, the environment's
    ``PIP_*`` as ``:env:.key``). Index URLs and timeouts pass as they are, ``file:`` indexes
    (host folders) are left out, and the CA bundle named by ``cert`` is mounted beside them.
    Returns no argument when there is nothing to pass.
    """
    settings: dict[str, str] = {}
    cert: str | None = None
    for line in config:
        found = re.match(r"^[^.]*\.([\w-]+)='(.*)'$", line.strip())
        if found is None:
            continue
        key, value = found.groups()
        if key == "cert":
            cert = value
        elif key in _PIP_KEYS:
            kept = " ".join(part for part in value.split() if not part.startswith("file:"))
            if kept:
                settings[key] = kept
    volumes: list[str] = []
    if cert and Path(cert).is_file():
        settings["cert"] = _PIP_CA
        volumes += ["--volume", f"{cert}:{_PIP_CA}:ro"]
    if not settings:
        return []
    conf = workdir / "pip.conf"
    conf.write_text("[global]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
    return [*volumes, "--volume", f"{conf}:{_PIP_CONF}:ro"]


def build_image(
    podman: Podman,
    *,
    tag: str,
    base: str,
    context: Path,
    pip_volumes: Sequence[str],
    build_args: Sequence[str] = (),
) -> float:
    """Build ``context``'s Dockerfile as ``tag`` on ``base``; the seconds it took.

    Docker format, so that the HEALTHCHECK is kept; host networking for pip (no bridge or
    DNS of podman's needed); layers cached between runs.
    """
    started = time.monotonic()
    args = ["build", "--format", "docker", "--network", "host", "--layers"]
    args += ["--build-arg", f"BASE_IMAGE={base}", *build_args, *pip_volumes, "-t", tag]
    podman.run(*args, str(context), timeout=900)
    return time.monotonic() - started
