"""--log-format: one JSON object per line, with the fields a log pipeline reads."""

from __future__ import annotations

import json
import logging
import signal
import sys

import pytest

from dot_proxy.logs import JsonFormatter, configure_logging
from tests.processes import Proxy


def _record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord(
        "dot_proxy.upstream.group", logging.WARNING, "x.py", 1, message, args, None
    )
    record.__dict__.update(extra)
    return record


def test_a_record_is_one_json_object_on_one_line() -> None:
    line = JsonFormatter().format(
        _record("%s is down\nreally", "1.1.1.1:853", upstream="1.1.1.1:853")
    )
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "WARNING"
    assert entry["logger"] == "dot_proxy.upstream.group"
    assert entry["message"] == "1.1.1.1:853 is down\nreally"
    assert entry["upstream"] == "1.1.1.1:853"
    assert entry["time"].endswith("+00:00") and "T" in entry["time"]
    assert isinstance(entry["pid"], int)


def test_an_exception_goes_in_its_own_field() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = _record("failed")
        record.exc_info = sys.exc_info()
    entry = json.loads(JsonFormatter().format(record))
    assert "ValueError: boom" in entry["exception"]


def test_configure_logging_again_changes_level_and_format(
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = logging.getLogger()
    level = root.level
    try:
        configure_logging("WARNING", "json")
        configure_logging("WARNING", "json")  # again: still one handler
        logging.getLogger("dot_proxy").warning("hello %d", 1)
        logging.getLogger("dot_proxy").info("not shown")
        lines = capsys.readouterr().err.splitlines()
        assert [json.loads(line)["message"] for line in lines] == ["hello 1"]
        configure_logging("INFO", "text")
        logging.getLogger("dot_proxy").info("plain")
        assert capsys.readouterr().err.rstrip().endswith("INFO dot_proxy: plain")
    finally:
        for handler in [h for h in root.handlers if type(h).__name__ == "_Stderr"]:
            root.removeHandler(handler)
        root.setLevel(level)


def test_the_proxy_logs_json_lines() -> None:
    proxy = Proxy(
        "--log-format",
        "json",
        "--listen",
        "127.0.0.1",
        "--port",
        "0",
        "--upstream",
        "127.0.0.1:1#dns.test",
    )
    try:
        proxy.wait_for_port()
        proxy.process.send_signal(signal.SIGTERM)
        assert proxy.finish() == 0
    finally:
        proxy.kill()
    entries = [json.loads(line) for line in proxy.stderr]
    assert any(entry["message"].startswith("listening on udp 127.0.0.1:") for entry in entries)
    assert entries[-1]["message"] == "stopped"
    assert {entry["logger"] for entry in entries} >= {"dot_proxy", "dot_proxy.serve.server"}
