"""pack_for_metric: the smallest archive whose task metric stays within a bound."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from ncz.format import UsageError
from ncz.models import MetricPackResult, load_state_dict, pack, pack_for_metric

MAX_EVALUATIONS = 8


@pytest.fixture(scope="module")
def task():
    """A student MLP fitted (a second of CPU) to a random teacher's labels; held-out points to score it.
    Its layers have ≥ 4096 weights, so the presets quantize them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared: more threads only spin
    try:
        torch.manual_seed(0)
        teacher = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))
        x = torch.randn(3000, 32)
        with torch.no_grad():
            y = teacher(x).argmax(1)
        model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64),
                                    torch.nn.ReLU(), torch.nn.Linear(64, 8))
        optimizer = torch.optim.Adam(model.parameters(), 3e-3)
        for _ in range(150):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[:2000]), y[:2000]).backward()
            optimizer.step()
        yield model, x[2000:], y[2000:]
    finally:
        torch.set_num_threads(threads)


def accuracy_of(x, y):
    def accuracy(model: torch.nn.Module) -> float:
        with torch.no_grad():
            return 100 * (model(x).argmax(1) == y).float().mean().item()
    return accuracy


def loss_of(template: torch.nn.Module, x, y):
    """Cross-entropy from a state dict (the form a checkpoint or the CLI gives)."""
    def loss(state: dict[str, torch.Tensor]) -> float:
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(torch.func.functional_call(template, state, (x,)), y).item()
    return loss


def check_curve(result: MetricPackResult) -> None:
    assert result.evaluations <= MAX_EVALUATIONS
    assert sum(p.evaluated for p in result.curve) == result.evaluations - 1  # + the baseline
    assert result.chosen in result.curve
    assert result.chosen.meets_bound
    assert result.file_bytes == result.path.stat().st_size
    points = result.by_scale
    assert [p.scale for p in points] == sorted(p.scale for p in points)
    # coarser targets never make a larger archive
    assert all(a.file_bytes >= b.file_bytes for a, b in zip(points, points[1:]))
    assert all(p.bits_per_weight == pytest.approx(8 * p.file_bytes / result.report.numel) for p in points)
    meeting = [p for p in result.curve if p.meets_bound]
    assert result.file_bytes == min(p.file_bytes for p in meeting)  # the smallest archive that met it
    assert not list(result.path.parent.glob(".ncz-metric-*"))  # the scratch folder is gone


def test_accuracy_bound_met_from_file_and_smaller_than_q8(task, tmp_path):
    model, x, y = task
    before = {k: v.clone() for k, v in model.state_dict().items()}
    accuracy = accuracy_of(x, y)
    baseline = accuracy(model)
    result = pack_for_metric(model, accuracy, 1.0, output=tmp_path / "m.ncz", max_evaluations=MAX_EVALUATIONS)
    check_curve(result)
    assert not result.lossless_fallback and result.baseline == pytest.approx(baseline)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the caller's model untouched
    # re-evaluated from the file the user gets
    reloaded = copy.deepcopy(model)
    reloaded.load_state_dict(load_state_dict(tmp_path / "m.ncz"))
    assert accuracy(reloaded) == result.metric
    assert baseline - accuracy(reloaded) <= 1.0 + 1e-4
    q8 = pack(model.state_dict(), tmp_path / "q8.ncz", recipe="q8")
    assert result.file_bytes < q8.file_bytes


def test_lower_is_better_relative_from_state_dict(task, tmp_path):
    model, x, y = task
    loss = loss_of(model, x, y)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    baseline = loss(state)
    result = pack_for_metric(state, loss, 0.02, output=tmp_path / "m.ncz", higher_is_better=False, relative=True)
    check_curve(result)
    assert not result.lossless_fallback
    measured = loss(load_state_dict(tmp_path / "m.ncz"))
    assert measured == result.metric
    assert (measured - baseline) / baseline <= 0.02 + 1e-5
    # a failing point is one whose loss rose by more than 2 %
    assert all((p.metric - baseline) / baseline > 0.02 for p in result.curve if not p.meets_bound)


def test_tighter_bound_gives_larger_archive(task, tmp_path):
    model, x, y = task
    loss = loss_of(model, x, y)
    state = dict(model.state_dict())
    loose = pack_for_metric(state, loss, 0.05, output=tmp_path / "loose.ncz", higher_is_better=False, relative=True)
    tight = pack_for_metric(state, loss, 0.002, output=tmp_path / "tight.ncz", higher_is_better=False, relative=True)
    assert tight.file_bytes >= loose.file_bytes
    # the writer is deterministic: the same search again writes the same bytes
    again = pack_for_metric(state, loss, 0.05, output=tmp_path / "again.ncz", higher_is_better=False, relative=True)
    assert (tmp_path / "again.ncz").read_bytes() == (tmp_path / "loose.ncz").read_bytes()
    assert again.curve == loose.curve


def test_unreachable_bound_falls_back_to_lossless(task, tmp_path):
    model, x, y = task
    state = dict(model.state_dict())
    calls = []

    def evaluate(weights: dict[str, torch.Tensor]) -> float:
        calls.append(1)
        exact = all(torch.equal(weights[k], state[k]) for k in state)
        return 1.0 if exact else 0.0  # any rounding at all breaks the bound

    result = pack_for_metric(state, evaluate, 0.0, output=tmp_path / "m.ncz")
    assert result.lossless_fallback
    assert result.chosen.scale is None and result.chosen.drop == 0.0 and not result.chosen.evaluated
    assert result.evaluations == len(calls) <= MAX_EVALUATIONS
    assert any(p.scale == pytest.approx(1 / 16) for p in result.curve)  # the most precise setting was tried
    assert all(torch.equal(v, state[k]) for k, v in load_state_dict(tmp_path / "m.ncz").items())


def test_identical_archives_are_evaluated_once(task, tmp_path):
    model, _, _ = task
    calls = []

    def constant(weights: dict[str, torch.Tensor]) -> float:
        calls.append(1)
        return 0.5

    result = pack_for_metric(dict(model.state_dict()), constant, 0.1, output=tmp_path / "m.ncz")
    # nothing ever drops: the search walks to the coarsest setting in big steps and stops there
    assert result.chosen.scale == max(p.scale for p in result.curve)
    assert len(calls) == result.evaluations <= 5


def test_errors(task, tmp_path):
    model, x, y = task
    state = dict(model.state_dict())
    with pytest.raises(UsageError, match="max_drop"):
        pack_for_metric(state, lambda s: 1.0, -1, output=tmp_path / "m.ncz")
    with pytest.raises(UsageError, match="no rel_error"):
        pack_for_metric(state, lambda s: 1.0, 0.1, output=tmp_path / "m.ncz", recipe="lossless")

    def broken(weights):
        raise RuntimeError("out of memory in my eval")
    with pytest.raises(UsageError, match="evaluate raised RuntimeError") as info:
        pack_for_metric(state, broken, 0.1, output=tmp_path / "m.ncz")
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(UsageError, match="finite"):
        pack_for_metric(state, lambda s: math.nan, 0.1, output=tmp_path / "m.ncz")
    with pytest.raises(UsageError, match="must return a float"):
        pack_for_metric(state, lambda s: "high", 0.1, output=tmp_path / "m.ncz")
    with pytest.raises(UsageError, match="non-zero baseline"):
        pack_for_metric(state, lambda s: 0.0, 0.1, output=tmp_path / "m.ncz", relative=True)
    assert not (tmp_path / "m.ncz").exists()
    assert not list(tmp_path.glob(".ncz-metric-*"))


def test_non_finite_metric_at_a_setting_breaks_the_bound(task, tmp_path):
    model, _, _ = task
    state = dict(model.state_dict())

    def perplexity(weights: dict[str, torch.Tensor]) -> float:  # overflows once weights are rounded coarsely
        error = max(((weights[k] - state[k]).norm() / state[k].norm()).item() for k in state if state[k].norm() > 0)
        return math.inf if error > 0.05 else 10.0 * (1 + error)

    result = pack_for_metric(state, perplexity, 0.5, output=tmp_path / "m.ncz", higher_is_better=False)
    check_curve(result)
    assert math.isfinite(result.metric)
    assert any(math.isinf(p.metric) and not p.meets_bound for p in result.curve)


def test_checkpoint_file_input(task, tmp_path):
    model, x, y = task
    torch.save(model.state_dict(), tmp_path / "model.pt")
    loss = loss_of(model, x, y)
    result = pack_for_metric(tmp_path / "model.pt", loss, 0.02, output=tmp_path / "m.ncz", higher_is_better=False,
                             relative=True, max_evaluations=4)
    assert result.evaluations <= 4 and result.chosen.meets_bound
    assert loss(load_state_dict(tmp_path / "m.ncz")) == result.metric
