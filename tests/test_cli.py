"""The CLI: exit codes, one-line errors, no tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ncz.tools.cli import main
from tests.conftest import VECTORS


def test_version_and_help(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("ncz ")
    assert main(["--help"]) == 0
    assert "verify" in capsys.readouterr().out


def test_usage_error_exits_2(capsys):
    assert main(["frobnicate"]) == 2
    assert main([]) == 2


def test_demo_info_verify(tmp_path, capsys):
    path = tmp_path / "demo.ncz"
    assert main(["demo", "-o", str(path)]) == 0
    assert main(["verify", str(path)]) == 0
    capsys.readouterr()
    assert main(["info", str(path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert {s["name"] for s in summary["sections"]} == {"notes", "weights", "ramp"}
    assert summary["file_bytes"] == path.stat().st_size
    assert main(["info", str(path)]) == 0
    assert "weights" in capsys.readouterr().out


@pytest.mark.parametrize("content", [b"", b"not an archive at all", (VECTORS / "basic.ncz").read_bytes()[:-5]])
def test_bad_file_one_line_exit_1(tmp_path, capsys, content):
    path = tmp_path / "bad.ncz"
    path.write_bytes(content)
    assert main(["verify", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.ncz" in err and "Traceback" not in err


def test_corrupt_payload_fails_verify(tmp_path, capsys):
    data = bytearray((VECTORS / "basic.ncz").read_bytes())
    data[70] ^= 0xFF  # inside the first payload
    path = tmp_path / "corrupt.ncz"
    path.write_bytes(bytes(data))
    assert main(["verify", str(path)]) == 1
    assert "checksum" in capsys.readouterr().err


def test_missing_file(capsys):
    assert main(["info", "/nonexistent/x.ncz"]) == 1
    assert "x.ncz" in capsys.readouterr().err


def test_console_script_runs_without_traceback(tmp_path):
    bad = tmp_path / "bad.ncz"
    bad.write_bytes(b"\x89NCZ\r\n\x1a\n" + bytes(60))
    proc = subprocess.run([sys.executable, "-m", "ncz.tools.cli", "verify", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


def test_closed_output_pipe_is_not_an_error(tmp_path, capsys, monkeypatch):
    """`ncz info x | head`: when the reader leaves, exit like shell tools (141), print nothing."""
    archive = tmp_path / "demo.ncz"
    assert main(["demo", "-o", str(archive)]) == 0
    capsys.readouterr()

    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["info", str(archive)]) == 141
    assert capsys.readouterr().err == ""
