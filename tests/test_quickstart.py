"""The README's main job runs end to end on what the package ships (no ../shared needed)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from ncz.codec import default_weights_path, load_codec
from ncz.tools import quickstart


def test_shipped_weights_load_and_fit_the_size_limit():
    path = default_weights_path()
    assert path.stat().st_size < 8 * 1024 * 1024
    runtime = load_codec(path)
    assert runtime.config.num_levels >= 4


def test_sample_image_ships_with_its_licence_note():
    image = quickstart.sample_image()
    assert Image.open(image).size == (768, 512)
    note = (image.parent / "README.md").read_text(encoding="utf-8")
    assert "Licence" in note and "kodim23.png" in note


def test_quickstart_main_job(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --out is relative: nothing may land elsewhere
    assert quickstart.main(["--out", "out"]) == 0
    out = capsys.readouterr().out
    assert "PSNR" in out and "bits/weight" in out
    assert len(out.splitlines()) < 15  # a summary, not the per-tensor table
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    decoded = np.asarray(Image.open(tmp_path / "out" / "kodim23.png"), dtype=np.float64)
    original = np.asarray(Image.open(quickstart.sample_image()), dtype=np.float64)
    assert decoded.shape == original.shape
    assert f"PSNR {10 * np.log10(255.0 ** 2 / np.mean((original - decoded) ** 2)):.2f} dB" in out


def test_quickstart_missing_image_is_one_line(tmp_path, capsys):
    assert quickstart.main(["--out", str(tmp_path / "o"), "--image", str(tmp_path / "nope.png")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope.png" in err
