"""Calibrated quantization: statistics collected right, same decoder, output error bounded, fewer bits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import ncz.format as nf
from ncz.models import Calibration, Recipe, calibrate, load_state_dict, pack
from ncz.models.quantized.calibrated import damped_inverse_factor, output_error, row_importance
from ncz.tools.cli import main

VOCAB, DIM, HIDDEN = 300, 32, 64


class ToyEncoder(torch.nn.Module):
    """Embedding → linear → ReLU → linear, mean-pooled over the mask (a sentence encoder in miniature)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, DIM)
        self.up = torch.nn.Linear(DIM, HIDDEN)
        self.down = torch.nn.Linear(HIDDEN, DIM)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.down(torch.relu(self.up(self.embed(input_ids))))
        mask = attention_mask.unsqueeze(-1).float()
        return (h * mask).sum(1) / mask.sum(1)


def _toy(seed: int = 0) -> ToyEncoder:
    torch.manual_seed(seed)
    model = ToyEncoder()
    with torch.no_grad():  # correlated, low-dimensional embeddings: what makes H far from diagonal
        basis = torch.randn(6, DIM)
        model.embed.weight.copy_(torch.randn(VOCAB, 6) @ basis + 0.05 * torch.randn(VOCAB, DIM))
    return model.eval()


def _batches(seed: int, count: int = 12, zipf: bool = True) -> list[dict[str, torch.Tensor]]:
    """Token ids with a Zipf-like frequency (id 0 is padding, masked out)."""
    g = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, VOCAB) if zipf else torch.ones(VOCAB - 1)
    out = []
    for _ in range(count):
        ids = torch.multinomial(weights, 16 * 20, replacement=True, generator=g).reshape(16, 20) + 1
        lengths = torch.randint(5, 21, (16,), generator=g)
        mask = (torch.arange(20)[None, :] < lengths[:, None]).long()
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out


def _recipe(rel_error: float) -> Recipe:
    return Recipe.from_dict({"rule": [
        {"pattern": "embed.weight", "representation": "quantized", "rel_error": rel_error, "granularity": "tensor"},
        {"pattern": "*", "ndim": 2, "representation": "quantized", "rel_error": rel_error, "granularity": "rowcol"},
        {"pattern": "*", "representation": "lossless"},
    ]}, "test")


def test_calibrate_collects_masked_statistics():
    model = _toy()
    batches = _batches(1, count=3)
    cal = calibrate(model, batches, source="toy")
    assert set(cal.hessians) == {"up.weight", "down.weight"} and set(cal.row_counts) == {"embed.weight"}
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    assert cal.samples == tokens
    counts = cal.row_counts["embed.weight"]
    assert int(counts.sum()) == tokens and counts[0] == 0  # padding never counted
    # H of the first linear is E[x xᵀ] over the unpadded tokens' embeddings
    xs = torch.cat([model.embed.weight[b["input_ids"][b["attention_mask"].bool()]] for b in batches]).double()
    expected = (xs.T @ xs / xs.shape[0]).float()
    torch.testing.assert_close(cal.hessians["up.weight"], expected, rtol=1e-4, atol=1e-6)
    assert model.training is False


def test_calibration_file_round_trip_and_refusals(tmp_path):
    cal = calibrate(_toy(), _batches(2, count=2), source="toy data")
    path = tmp_path / "cal.ncz"
    cal.save(path)
    back = Calibration.load(path)
    assert back.source == "toy data" and back.samples == cal.samples
    for name, h in cal.hessians.items():
        assert torch.equal(back.hessians[name], h)
    for name, c in cal.row_counts.items():
        assert torch.equal(back.row_counts[name], c)
    other = tmp_path / "weights.ncz"
    pack({"w": torch.zeros(4, 4)}, other)
    with pytest.raises(nf.InputError, match="not a calibration file"):
        Calibration.load(other)
    # a tensor that is neither hessian/<name> (square) nor rows/<name> (1-D)
    bad = tmp_path / "bad.ncz"
    pack({"hessian/w": torch.zeros(3, 4)}, bad, metadata={"content": "ncz-calibration/v1"})
    with pytest.raises(nf.InputError, match="neither"):
        Calibration.load(bad)


def test_indefinite_hessian_is_an_input_error():
    h = np.array([[1.0, 5.0], [5.0, 1.0]])  # eigenvalues 6 and −4: no damping of 10 % fixes that
    with pytest.raises(nf.InputError, match="positive semi-definite"):
        damped_inverse_factor(h)


def test_calibrated_pack_bounds_output_error_with_fewer_bits(tmp_path):
    model = _toy()
    cal = calibrate(model, _batches(3), source="toy")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    plain, tuned = tmp_path / "plain.ncz", tmp_path / "tuned.ncz"
    rep_plain = pack(state, plain, recipe=_recipe(0.05))
    rep_tuned = pack(state, tuned, recipe=_recipe(0.05), calibration=cal)
    linear = {"up.weight", "down.weight"}
    size = {k: sum(t.stored_bytes for t in r.tensors if t.name in linear) for k, r in (("plain", rep_plain),
                                                                                     ("tuned", rep_tuned))}
    assert size["tuned"] < 0.75 * size["plain"], size
    with nf.open(tuned) as reader:
        assert reader.metadata["calibration"] == "toy" and reader.metadata["calibration_samples"] == cal.samples
    a, b = load_state_dict(plain), load_state_dict(tuned)  # the ordinary decoder reads both
    for name in ("up.weight", "down.weight"):
        h = cal.hessians[name].numpy()
        e_plain = output_error((state[name] - a[name]).numpy(), h)
        e_tuned = output_error((state[name] - b[name]).numpy(), h)
        assert e_tuned <= e_plain * (1 + 1e-6), name
    weights = row_importance(cal.row_counts["embed.weight"].double().numpy())[:, None]
    err = {k: float((weights * (state["embed.weight"] - s["embed.weight"]).double().numpy() ** 2).sum())
           for k, s in (("plain", a), ("tuned", b))}
    assert err["tuned"] <= err["plain"] * (1 + 1e-6)


def test_calibrated_model_generalizes_to_fresh_inputs(tmp_path):
    """Fewer bits, and on inputs the calibration never saw the outputs are no worse."""
    model = _toy()
    cal = calibrate(model, _batches(4), source="toy")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    pack(state, tmp_path / "plain.ncz", recipe=_recipe(0.05))
    pack(state, tmp_path / "tuned.ncz", recipe=_recipe(0.05), calibration=cal)
    fresh = _batches(99, count=4)
    with torch.no_grad():
        reference = torch.cat([model(**b) for b in fresh])
        errors = {}
        for kind in ("plain", "tuned"):
            copy = _toy()
            copy.load_state_dict(load_state_dict(tmp_path / f"{kind}.ncz"))
            errors[kind] = float((torch.cat([copy(**b) for b in fresh]) - reference).norm() / reference.norm())
    assert errors["tuned"] <= 1.1 * errors["plain"], errors
    assert math.isfinite(errors["tuned"]) and errors["tuned"] < 0.2


def test_frequent_rows_get_finer_steps(tmp_path):
    model = _toy()
    cal = calibrate(model, _batches(5), source="toy")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    pack(state, tmp_path / "tuned.ncz", recipe=_recipe(0.1), calibration=cal)
    decoded = load_state_dict(tmp_path / "tuned.ncz")["embed.weight"]
    counts = cal.row_counts["embed.weight"]
    row_err = ((decoded - state["embed.weight"]).norm(dim=1) / state["embed.weight"].norm(dim=1)).numpy()
    order = torch.argsort(counts, descending=True).numpy()
    assert row_err[order[:20]].mean() < 0.5 * row_err[order[-50:]].mean()


def test_cli_pack_with_calibration(tmp_path, capsys):
    model = _toy()
    cal = calibrate(model, _batches(6, count=3), source="toy")
    cal.save(tmp_path / "cal.ncz")
    torch.save(model.state_dict(), tmp_path / "toy.pt")
    out = tmp_path / "toy.ncz"
    assert main(["pack", str(tmp_path / "toy.pt"), "-o", str(out), "--preset", "q4",
                 "--calibration", str(tmp_path / "cal.ncz"), "-q"]) == 0
    with nf.open(out) as reader:
        assert reader.metadata["calibration"] == "toy"
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    assert "calibrated on toy" in capsys.readouterr().out
    assert main(["pack", str(tmp_path / "toy.pt"), "-o", str(tmp_path / "x.ncz"),
                 "--calibration", str(tmp_path / "toy.pt")]) == 1
    err = capsys.readouterr().err
    assert "toy.pt" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_calibrated_rel_error_applies_only_with_calibration(tmp_path):
    model = _toy()
    cal = calibrate(model, _batches(7, count=3), source="toy")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def recipe(extra: dict) -> Recipe:
        return Recipe.from_dict({"rule": [
            {"pattern": "*", "ndim": 2, "representation": "quantized", "rel_error": 0.01, "granularity": "rowcol",
             **extra},
            {"pattern": "*", "representation": "lossless"}]}, "t")

    plain = pack(state, tmp_path / "a.ncz", recipe=recipe({}))
    ignored = pack(state, tmp_path / "b.ncz", recipe=recipe({"calibrated_rel_error": 0.1}))
    assert (tmp_path / "a.ncz").read_bytes() == (tmp_path / "b.ncz").read_bytes()
    tight = pack(state, tmp_path / "c.ncz", recipe=recipe({}), calibration=cal)
    loose = pack(state, tmp_path / "d.ncz", recipe=recipe({"calibrated_rel_error": 0.1}), calibration=cal)
    assert loose.file_bytes < tight.file_bytes < plain.file_bytes == ignored.file_bytes
