"""The CLI: exit codes, one-line errors, no tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import ncz.format as nf
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


# --- hostile section names, several images, usage errors (issue 12) -------------------------------------


@pytest.fixture(scope="module")
def image_archive(tmp_path_factory) -> bytes:
    """A real one-image archive (shipped weights) whose section the tests clone under other names."""
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("img")
    rng = np.random.default_rng(3)
    Image.fromarray((rng.random((32, 48, 3)) * 255).astype(np.uint8)).save(folder / "in.png")
    assert main(["encode", str(folder / "in.png"), "-o", str(folder / "in.ncz"), "--quality", "2"]) == 0
    return (folder / "in.ncz").read_bytes()


def _renamed(data: bytes, names: list[str]) -> bytes:
    """The archive's one image, once per name (checksums valid)."""
    from tests.hostile_files import Section, build

    with nf.open_bytes(data) as reader:
        info = next(s for s in reader.sections if s.kind == nf.Kind.IMAGE)
        stored = bytes(reader.stored(info.name))
        header = reader.metadata
    return build([Section(name, nf.Kind.IMAGE, nf.Codec.RAW, stored, None, dict(info.params)) for name in names],
                 header)


def _tree(root) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_decode_names_never_leave_the_folder(image_archive, tmp_path, capsys):
    names = ["../../evil", "/abs/evil", "sub/dir/x", "ctl\x1b[31m", "nul\x00byte", "..", "C:\\win"]
    (tmp_path / "in.ncz").write_bytes(_renamed(image_archive, names))
    assert main(["decode", str(tmp_path / "in.ncz"), "-o", str(tmp_path / "out")]) == 0
    assert _tree(tmp_path) == {"in.ncz", "out", "out/_.._evil.png", "out/_abs_evil.png", "out/sub_dir_x.png",
                               "out/ctl_[31m.png", "out/nul_byte.png", "out/image.png", "out/C__win.png"}
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("names", [["a", "A"], ["x/y", "x_y"], ["a", "a.", " a"]], ids=["case", "separator", "dots"])
def test_decode_refuses_names_that_collide(image_archive, tmp_path, capsys, names):
    (tmp_path / "in.ncz").write_bytes(_renamed(image_archive, names))
    assert main(["decode", str(tmp_path / "in.ncz"), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "in.ncz" in err and "would both be written" in err
    assert _tree(tmp_path) == {"in.ncz"}  # checked before anything is decoded or created


def test_several_images_need_a_folder_or_a_choice(image_archive, tmp_path, capsys):
    (tmp_path / "two.ncz").write_bytes(_renamed(image_archive, ["first", "second"]))
    for output in ("-", str(tmp_path / "single.png")):
        assert main(["decode", str(tmp_path / "two.ncz"), "-o", output]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and "--image NAME" in captured.err and captured.err.count("\n") == 1
    assert _tree(tmp_path) == {"two.ncz"}  # no folder named '-' or 'single.png'
    assert main(["decode", str(tmp_path / "two.ncz"), "-o", str(tmp_path / "one.png"), "--image", "second"]) == 0
    assert main(["decode", str(tmp_path / "two.ncz"), "-o", "x.png", "--image", "third"]) == 2
    assert _tree(tmp_path) == {"two.ncz", "one.png"}


def test_per_file_pixel_cap(image_archive, tmp_path, capsys):
    (tmp_path / "two.ncz").write_bytes(_renamed(image_archive, ["first", "second"]))
    assert main(["decode", str(tmp_path / "two.ncz"), "-o", str(tmp_path / "out"), "--max-pixels", "2000"]) == 1
    assert "max_image_pixels" in capsys.readouterr().err  # 2 × 48×32 > 2000, refused before the second
    assert main(["decode", str(tmp_path / "two.ncz"), "-o", str(tmp_path / "out"), "--max-pixels", "0"]) == 2


def test_quality_out_of_range_is_a_usage_error(image_archive, tmp_path, capsys):
    png = tmp_path / "in.png"
    from PIL import Image

    Image.new("RGB", (16, 16)).save(png)
    assert main(["encode", str(png), "-o", str(tmp_path / "x.ncz"), "--quality", "99"]) == 2
    assert "--quality" in capsys.readouterr().err
    assert not (tmp_path / "x.ncz").exists()


def test_info_escapes_names_and_writes_strict_json(tmp_path, capsys):
    path = tmp_path / "x.ncz"
    with nf.Writer(path, metadata={"note": "\x1b]0;owned\x07"}) as writer:
        writer.add("\x1b[2Jclear", b"x", params={"big": float("inf"), "small": float("-inf")})
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\\x1b[2Jclear" in out
    assert main(["info", str(path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert summary["sections"][0]["params"] == {"big": "inf", "small": "-inf"}


def test_errors_name_the_target_not_the_temp_file(tmp_path, capsys):
    missing = tmp_path / "no-such-folder" / "x.ncz"
    assert main(["demo", "-o", str(missing)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{missing}:" in err and ".tmp" not in err


def test_last_resort_errors_are_one_line(monkeypatch, tmp_path, capsys):
    import ncz.tools.cli as cli

    def boom(args):
        raise RuntimeError("internal detail\nsecond line")

    monkeypatch.setattr(cli, "cmd_verify", boom)
    parser_func = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with_func(parser_func(), "verify", boom))
    assert main(["verify", str(VECTORS / "basic.ncz")]) == 1
    assert capsys.readouterr().err == "ncz: error: RuntimeError: internal detail\n"


def _with_func(parser, command, func):
    parser._subparsers._group_actions[0].choices[command].set_defaults(func=func)
    return parser
