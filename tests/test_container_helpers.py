"""The pure parts of dot_proxy/testing/container.py (nox -s container builds and runs the image)."""

from __future__ import annotations

from pathlib import Path

from dot_proxy.testing.container import apt_mirror, dockerfile_default_base, pip_settings

ROOT = Path(__file__).resolve().parent.parent


def test_pip_gets_the_index_settings_and_the_ca_but_no_host_folder(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    config = [
        f":env:.cert='{ca}'",
        ":env:.default-timeout='180'",
        ":env:.find-links='/opt/wheels'",
        "global.extra-index-url='file:///opt/pypi/simple https://mirror.test/simple'",
        "global.constraint='/etc/xdg/pip/constraints.txt'",
        "global.index-url='https://index.test/simple'",
    ]
    volumes = pip_settings(tmp_path, config)
    assert volumes == [
        "--volume",
        f"{ca}:/run/dot-proxy-build/ca.pem:ro",
        "--volume",
        f"{tmp_path / 'pip.conf'}:/etc/pip.conf:ro",
    ]
    assert (tmp_path / "pip.conf").read_text() == (
        "[global]\n"
        "default-timeout = 180\n"
        "extra-index-url = https://mirror.test/simple\n"
        "index-url = https://index.test/simple\n"
        "cert = /run/dot-proxy-build/ca.pem\n"
    )


def test_nothing_to_pass_means_no_mount(tmp_path: Path) -> None:
    assert pip_settings(tmp_path, ["global.find-links='/opt/wheels'"]) == []


def test_debootstrap_uses_the_mirror_apt_uses(tmp_path: Path) -> None:
    (tmp_path / "etc/apt/sources.list.d").mkdir(parents=True)
    (tmp_path / "etc/os-release").write_text('PRETTY_NAME="Debian"\nVERSION_CODENAME=trixie\n')
    (tmp_path / "etc/apt/sources.list.d/debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.test/debian-security\nSuites: trixie-security\n\n"
        "Types: deb\nURIs: http://mirror.test/debian\nSuites: trixie\n"
    )
    assert apt_mirror(tmp_path) == ("http://mirror.test/debian", "trixie")
    (tmp_path / "etc/apt/sources.list").write_text(
        "deb [arch=amd64] http://old.test/debian trixie main\n"
    )
    assert apt_mirror(tmp_path) == ("http://old.test/debian", "trixie")


def test_the_dockerfile_names_a_fully_qualified_default_base() -> None:
    # Fully qualified: podman resolves no short names where no search registry is set.
    assert dockerfile_default_base(ROOT / "Dockerfile").startswith("docker.io/")
