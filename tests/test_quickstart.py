"""The README's main job runs end to end on the shipped weights."""

from __future__ import annotations

import numpy as np
from PIL import Image

from ncz.codec import default_weights_path, load_codec
from ncz.tools import quickstart
from tests.conftest import shared_data


def test_shipped_weights_load_and_fit_the_size_limit():
    path = default_weights_path()
    assert path.stat().st_size < 8 * 1024 * 1024
    runtime = load_codec(path)
    assert runtime.config.num_levels >= 4


def test_quickstart_main_job(tmp_path, capsys):
    image = shared_data("kodak", "kodim23.png")
    assert quickstart.main(["--out", str(tmp_path), "--image", str(image)]) == 0
    out = capsys.readouterr().out
    assert "PSNR" in out and "tensors restored" in out
    decoded = np.asarray(Image.open(tmp_path / "kodim23.png"))
    assert decoded.shape == np.asarray(Image.open(image)).shape
