"""The training-curves PNG (ncz.tools.train_curves): tolerant reading, a real plot, CLI errors."""
from __future__ import annotations

import json

import pytest

from ncz.tools.train_curves import main, read_log

LEVELS = [{"level": i, "lam": lam, "bpp": 0.1 * (i + 1), "psnr": 26.0 + 2 * i} for i, lam in enumerate((0.002, 0.01))]


def _log(path, steps=range(0, 400, 50)):
    lines = [json.dumps({"event": "start", "step": 0})]
    for s in steps:
        lr = 1e-4 if s < 200 else 1e-5
        lines.append(json.dumps({"event": "train", "step": s + 50, "loss": 1.5 - s / 1e4, "lr": lr}))
        if s % 100 == 0:
            better = [{**lv, "bpp": lv["bpp"] * (1 - s / 1e4), "psnr": lv["psnr"] + s / 1e3} for lv in LEVELS]
            lines.append(json.dumps({"event": "eval", "step": s, "levels": better}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_read_log_skips_what_is_not_a_record(tmp_path):
    path = _log(tmp_path / "train_log.jsonl")
    with open(path, "a") as f:
        f.write('{"event": "train", "step": 9')  # a run killed mid-write
        f.write("\n[1, 2]\n\"text\"\n{\"event\": \"train\"}\n")  # not objects, or without a step
    records = read_log(path)
    assert len(records) == 1 + 8 + 4
    assert all(isinstance(r["step"], int) for r in records)


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib", reason="the curves need matplotlib (bench extra)")
    path = _log(tmp_path / "train_log.jsonl")
    assert main([str(path)]) == 0
    png = tmp_path / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp.png"))  # written atomically


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "missing.jsonl")]) == 1
    empty = tmp_path / "empty.jsonl"
    empty.write_text("not json\n")
    assert main([str(empty)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("train_curves: ") for line in err)
    with pytest.raises(SystemExit) as usage:
        main([])
    assert usage.value.code == 2
