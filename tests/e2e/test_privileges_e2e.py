"""Started as root with ``--user``: what is read before the drop, and the user it runs as.

Run for real: this project's machines and CI run the tests as root. The CA file lies in a
directory only root may enter, mode 0600, as a key or CA under /etc/ssl/private would: the
proxy reads it before it becomes ``nobody``, then serves as ``nobody``.
"""

from __future__ import annotations

import os
import pwd
import shutil
from collections.abc import Callable
from pathlib import Path

import dns.rcode
import pytest

from dot_proxy.testing import realdns

pytestmark = pytest.mark.e2e


def _uids(pid: int) -> list[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return [int(field) for field in line.split()[1:]]
    raise AssertionError("no Uid line")


def test_as_root_with_user_a_root_only_ca_file_is_read_before_the_drop(
    pki: realdns.Pki,
    start_dot_proxy: Callable[..., realdns.DotProxy],
    tmp_path: Path,
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: the test drops privileges for real")
    nobody = pwd.getpwnam("nobody")
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    ca_file = private / "ca.pem"
    shutil.copyfile(pki.ca_file, ca_file)
    ca_file.chmod(0o600)

    proxy = start_dot_proxy("--ca-file", str(ca_file), "--user", "nobody")

    answer = realdns.udp_query(proxy.port, "h3.test", "A")
    assert answer.rcode() == dns.rcode.NOERROR
    assert [rr.to_text() for rr in answer.answer[0]] == [realdns.Zone().a_address(3)]
    assert _uids(proxy.pid) == [nobody.pw_uid] * 4  # real, effective, saved, filesystem
    assert proxy.stop() == 0
    log = proxy.log_text()
    assert "running as user nobody" in log
    assert "Traceback" not in log, log
