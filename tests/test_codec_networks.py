"""Fast tests of the codec networks and training loop (tiny models, < 30 s)."""
from __future__ import annotations

import math

import pytest
import torch

from ncz.codec.growth import add_levels
from ncz.codec.layers import GDN
from ncz.codec.networks import (
    CodecConfig,
    EntropyBottleneck,
    HyperpriorCodec,
    crop,
    gaussian_likelihood,
    pad_to_multiple,
)
from ncz.codec.train import TrainConfig, Trainer, evaluate_codec

TINY = dict(N=16, M=24, lambdas=(0.002, 0.01, 0.05))


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small models: tests/conftest.py says why


def _tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return HyperpriorCodec(CodecConfig(**{**TINY, **kw}))


def _images(n=6, seed=0):
    """Smooth-ish random uint8 images (upsampled noise) so there is something to learn."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        h, w = 80 + 8 * i, 96 + 4 * i
        low = torch.rand(1, 3, h // 8, w // 8, generator=g)
        img = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[0]
        out.append((img * 255).round().clamp(0, 255).to(torch.uint8))
    return out


@pytest.mark.parametrize("hw", [(64, 64), (65, 97), (37, 130)])
def test_shapes_odd_sizes(hw):
    m = _tiny()
    x = torch.rand(2, 3, *hw)
    xp, size = pad_to_multiple(x, 64)
    assert xp.shape[-2] % 64 == 0 and xp.shape[-1] % 64 == 0
    assert size == hw
    assert torch.equal(crop(xp, size), x)
    for training in (True, False):
        m.train(training)
        x_hat, lik = m(xp, 1.0)
        assert x_hat.shape == xp.shape
        assert crop(x_hat, size).shape == x.shape
        Hy, Wy = xp.shape[-2] // 16, xp.shape[-1] // 16
        assert lik["y"].shape == (2, TINY["M"], Hy, Wy)
        assert lik["z"].shape == (2, TINY["N"], Hy // 4, Wy // 4)
    y = m.analysis(xp, 0.5)
    z = m.hyper_analysis(y)
    mean, scale = m.hyper_synthesis(torch.round(z))
    assert mean.shape == y.shape == scale.shape
    assert bool((scale >= m.config.scale_bound).all())
    assert m.synthesis(y, 0.5).shape == xp.shape


def test_likelihoods_in_unit_interval():
    m = _tiny()
    x = torch.rand(2, 3, 64, 128)
    for training in (True, False):
        m.train(training)
        _, lik = m(x, torch.tensor([0.0, 2.0]))
        for v in lik.values():
            assert bool(((v > 0) & (v <= 1)).all())
    # Gaussian conditional: pmf over integers sums to ~1, and is in (0, 1].
    k = torch.arange(-50, 51, dtype=torch.float32)[:, None]
    mean = torch.tensor([0.3, -1.7, 4.2])
    scale = torch.tensor([0.05, 1.0, 7.0])
    p = gaussian_likelihood(k + torch.round(mean) + (mean - torch.round(mean)), mean, scale)
    assert bool(((p > 0) & (p <= 1)).all())
    assert torch.allclose(p.sum(0), torch.ones(3), atol=1e-5)


def test_entropy_bottleneck_cdf_and_pmf():
    eb = EntropyBottleneck(4)
    x = torch.linspace(-50, 50, 201, dtype=torch.float64).expand(4, -1).contiguous()
    c = eb.cdf(x)
    assert bool((c[:, 1:] >= c[:, :-1]).all()), "CDF must be monotone"
    lo, hi = eb.support(tail_mass=1e-6)
    assert bool((lo < hi).all())
    for ch in range(4):
        p = eb.integer_pmf(int(lo[ch]), int(hi[ch]))[ch]
        assert 1 - 1e-6 - 1e-9 <= float(p.sum()) <= 1 + 1e-9
    # likelihood() on integer z matches integer_pmf
    z = torch.stack([torch.tensor([-2.0, 0.0, 3.0])] * 4)[None, :, :, None]  # (1, 4, 3, 1)
    lik = eb.likelihood(z)
    ref = eb.integer_pmf(-2, 3)[:, [0, 2, 5]].float()
    assert torch.allclose(lik[0, :, :, 0], ref, rtol=1e-4, atol=1e-7)


def test_gdn_inverse_sanity():
    torch.manual_seed(0)
    g, ig = GDN(8), GDN(8, inverse=True)
    x = torch.randn(2, 8, 5, 7)
    # With γ = 0 both are pure per-channel scalings by β^∓½: exact inverses.
    with torch.no_grad():
        for m in (g, ig):
            m.gamma.zero_()
            m.beta.copy_(m.beta_reparam.init(torch.rand(8) + 0.5))
        ig.beta.copy_(g.beta)
    assert torch.allclose(ig(g(x)), x, atol=1e-5)
    # With the default init (β = 1, γ = 0.1·I) IGDN∘GDN ≈ identity for small inputs.
    g, ig = GDN(8), GDN(8, inverse=True)
    xs = 0.05 * x
    assert torch.allclose(ig(g(xs)), xs, atol=1e-5)
    # The reparametrization keeps β ≥ β_min and γ ≥ 0 whatever the raw values.
    with torch.no_grad():
        g.beta.fill_(-3.0)
        g.gamma.fill_(-3.0)
    beta, gamma = g.effective_params()
    assert bool((beta >= 1e-6 * 0.999).all()) and bool((gamma >= 0).all())
    assert bool(torch.isfinite(g(x)).all())


def test_gains_monotone_and_interpolate():
    m = _tiny()
    gs = [m.gains.gain(q) for q in range(m.num_levels)]
    for a, b in zip(gs, gs[1:]):
        assert bool((b > a).all()), "higher quality level must have larger gain"
    mid = m.gains.gain(0.5)
    assert torch.allclose(mid, torch.sqrt(gs[0] * gs[1]), rtol=1e-5)
    per_sample = m.gains.gain(torch.tensor([0.0, 2.0]))
    assert per_sample.shape == (2, TINY["M"], 1, 1)
    assert torch.allclose(per_sample[1], gs[2][0])
    assert math.isclose(float(m.lambda_for(0.5)), math.sqrt(0.002 * 0.01), rel_tol=1e-5)


def _cfg(tmp_path, **kw):
    base = dict(out_dir=str(tmp_path), steps=100, batch_size=2, crop=64, lr=1e-3, warmup_steps=0,
                bf16=False, channels_last=False, seed=123, ckpt_every=0, ckpt_seconds=1e9,
                keep_every=0, eval_every=0, log_every=0, N=TINY["N"], M=TINY["M"], lambdas=TINY["lambdas"])
    base.update(kw)
    return TrainConfig(**base)


def test_bpp_decreases_with_quality_after_training(tmp_path):
    imgs = _images()
    tr = Trainer(_cfg(tmp_path), images=imgs, eval_images=imgs[:2])
    for _ in range(15):
        tr.train_step()
    rep = evaluate_codec(tr.model, imgs[:2])
    bpps = [level.bpp for level in rep.levels]
    assert bpps == sorted(bpps) and bpps[0] < bpps[-1], bpps


def test_resume_is_exact(tmp_path):
    imgs = _images()
    ref = Trainer(_cfg(tmp_path / "a"), images=imgs, eval_images=[])
    ref_losses = [ref.train_step()["loss"] for _ in range(4)]

    first = Trainer(_cfg(tmp_path / "b"), images=imgs, eval_images=[])
    got = [first.train_step()["loss"] for _ in range(2)]
    ckpt = first.save_checkpoint()
    del first
    torch.manual_seed(999)  # disturb the global RNG: the checkpoint must restore it
    second = Trainer(_cfg(tmp_path / "b", seed=7), images=imgs, eval_images=[])
    second.load_checkpoint(ckpt)
    assert second.step == 2
    got += [second.train_step()["loss"] for _ in range(2)]
    assert got == ref_losses


def test_train_loop_writes_log_and_checkpoint(tmp_path):
    imgs = _images()
    cfg = _cfg(tmp_path, steps=4, log_every=2, ckpt_every=2, eval_every=4, keep_every=4)
    tr = Trainer(cfg, images=imgs, eval_images=imgs[:1])
    seen, evals = [], []
    assert tr.train(on_step=seen.append, on_eval=evals.append) == 4
    assert [r.step for r in seen] == [1, 2, 3, 4]
    assert len(evals) == 1 and len(evals[0].levels) == 3
    assert (tmp_path / "latest.pt").exists() and (tmp_path / "weights_00000004.pt").exists()
    lines = (tmp_path / "train_log.jsonl").read_text().splitlines()
    assert any('"event": "eval"' in line for line in lines)
    assert Trainer.read_model_config(tmp_path / "latest.pt") == tr.model_config


def test_thread_tuner_switches_to_faster_setting():
    from ncz.codec.threads import ThreadTuner

    before = torch.get_num_threads()
    try:
        tuner = ThreadTuner(2, probe_every=10, probe_len=3)
        assert tuner.current == 1
        fake = {1: 3.0, 2: 1.0}  # pretend 2 threads are 3x faster
        decisions = []
        for _ in range(40):
            d = tuner.record(fake[tuner.active])
            if d:
                decisions.append(d)
        assert decisions and tuner.current == 2
        fake = {1: 1.0, 2: 5.0}  # now the CPU is oversubscribed: back to 1
        for _ in range(40):
            tuner.record(fake[tuner.active])
        assert tuner.current == 1
    finally:
        torch.set_num_threads(before)


def test_thread_tuner_probes_after_a_time_too():
    """Steps that slow down tenfold (other jobs started) must not delay the next probe by tenfold."""
    from ncz.codec.threads import ThreadTuner

    before = torch.get_num_threads()
    try:
        tuner = ThreadTuner(2, probe_every=1000, probe_len=3, probe_after_s=60.0)
        fake = {1: 3.0, 2: 1.0}
        for _ in range(1000 - 2 * 3):  # the early first probe: 1 -> 2 threads
            tuner.record(fake[tuner.active])
            if tuner.current == 2:
                break
        assert tuner.current == 2
        fake = {1: 2.0, 2: 20.0}  # load arrived: 2 threads now 10x slower
        steps = 0
        while tuner.current == 2 and steps < 100:
            tuner.record(fake[tuner.active])
            steps += 1
        assert tuner.current == 1 and steps <= 10  # ~60 s of slow steps, not 1,000 steps
    finally:
        torch.set_num_threads(before)


def test_thread_tuner_probes_when_steps_jump():
    """A job starting beside training makes 2 threads 3x slower: probe within a few steps, not 600 s."""
    from ncz.codec.threads import ThreadTuner

    def settle(tuner, fake):
        for _ in range(20):
            tuner.record(fake[tuner.active])
        while tuner.probe is not None:  # let a scheduled probe finish
            tuner.record(fake[tuner.active])
        tuner.probe_every = 10_000  # the next scheduled probe is far away

    before = torch.get_num_threads()
    try:
        tuner = ThreadTuner(2, probe_every=10, probe_len=3, probe_after_s=1e9)
        settle(tuner, {1: 0.7, 2: 0.38})
        assert tuner.current == 2
        fake = {1: 0.7, 2: 1.2}  # past 2x the 0.38 the setting was chosen at, yet under 2x 1 thread's 0.7
        steps = 0
        while tuner.current == 2 and steps < 100:
            tuner.record(fake[tuner.active])
            steps += 1
        assert tuner.current == 1 and steps <= 8
        assert tuner.reference == 0.7  # the new setting's time is the reference now
        # both settings slow: the probe keeps 2 threads, and its time becomes the reference, so the
        # steady load does not set off probe after probe
        tuner = ThreadTuner(2, probe_every=10, probe_len=3, probe_after_s=1e9)
        settle(tuner, {1: 0.7, 2: 0.38})
        fake = {1: 1.5, 2: 1.0}
        decisions = [d for d in (tuner.record(fake[tuner.active]) for _ in range(60)) if d]
        assert len(decisions) == 1 and decisions[0]["threads"] == 2 and tuner.reference == 1.0
    finally:
        torch.set_num_threads(before)


def test_subpixel_deconv_is_the_same_function():
    from ncz.codec.layers import SubpixelDeconv

    torch.manual_seed(3)
    deconv = torch.nn.ConvTranspose2d(6, 5, 5, stride=2, padding=2, output_padding=1)
    x = torch.randn(2, 6, 7, 9)
    with torch.no_grad():
        torch.testing.assert_close(SubpixelDeconv(deconv)(x), deconv(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        SubpixelDeconv(torch.nn.ConvTranspose2d(6, 5, 3, stride=2, padding=1, output_padding=1))


def test_inference_transforms_match_the_trained_ones():
    from ncz.codec.layers import AnalysisTransform, SynthesisTransform, inference_transform

    torch.manual_seed(4)
    g_s = SynthesisTransform(16, 24).eval()
    g_a = AnalysisTransform(16, 24).eval()
    y = torch.randn(1, 24, 4, 6) * 3
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(inference_transform(g_s)(y), g_s(y), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(inference_transform(g_a)(x), g_a(x), rtol=1e-4, atol=1e-5)


def test_add_levels_keeps_trained_levels_and_extrapolates_new_ones(tmp_path):
    imgs = _images()
    tr = Trainer(_cfg(tmp_path), images=imgs, eval_images=[])
    for _ in range(3):
        tr.train_step()
    state = tr.state_dict()
    low, mid = TINY["lambdas"][0] / 2, math.sqrt(TINY["lambdas"][0] * TINY["lambdas"][1])
    grown = add_levels(state, [low, mid, TINY["lambdas"][1]])  # an existing λ is ignored
    lams = CodecConfig.from_dict(grown["model_config"]).lambdas
    assert lams == tuple(sorted(TINY["lambdas"] + (low, mid)))
    old_gain = state["model"]["gains.log_gain"]
    new_gain = grown["model"]["gains.log_gain"]
    for i, lam in enumerate(TINY["lambdas"]):
        assert torch.equal(new_gain[lams.index(lam)], old_gain[i])
    # mid lies halfway (in log λ) between levels 0 and 1; low is extrapolated linearly below level 0
    assert torch.allclose(new_gain[lams.index(mid)], (old_gain[0] + old_gain[1]) / 2, atol=1e-6)
    t = (math.log(low) - math.log(TINY["lambdas"][0])) / (math.log(TINY["lambdas"][1]) - math.log(TINY["lambdas"][0]))
    assert torch.allclose(new_gain[0], old_gain[0] + t * (old_gain[1] - old_gain[0]), atol=1e-6)
    assert state["model"]["gains.log_gain"] is old_gain and old_gain.shape[0] == len(TINY["lambdas"])  # input untouched
    # the grown checkpoint resumes training, new rows' Adam moments included
    cfg = _cfg(tmp_path / "grown", lambdas=lams)
    resumed = Trainer(cfg, model_config=CodecConfig.from_dict(grown["model_config"]), images=imgs, eval_images=[])
    resumed.load_state_dict(grown)
    assert resumed.step == 3 and resumed.model.num_levels == len(lams)
    assert math.isfinite(resumed.train_step()["loss"])
    assert add_levels(state, list(TINY["lambdas"])) is state
    with pytest.raises(ValueError):
        add_levels(state, [-1.0])


def test_weight_average_tracks_training_and_survives_resume(tmp_path):
    """The moving average is what evaluation reports and snapshots ship; a checkpoint restores it."""
    imgs = _images()
    tr = Trainer(_cfg(tmp_path, ema_decay=0.5), images=imgs, eval_images=[])
    start = [p.detach().clone() for p in tr.model.parameters()]
    for _ in range(3):
        tr.train_step()
    trained = list(tr.model.parameters())
    averaged = list(tr.ema_model.parameters())
    moved = [float((a - s).abs().max()) for a, s in zip(averaged, start)]
    assert max(moved) > 0, "the average never moved"
    assert any(not torch.equal(a, t) for a, t in zip(averaged, trained)), "the average is a copy of the iterate"
    assert tr.export_model is tr.ema_model
    snap = torch.load(tr.save_weights(tmp_path / "w.pt"), weights_only=True)
    assert snap["ema"] is True and torch.equal(snap["model"]["g_a.0.weight"], tr.ema_model.g_a[0].weight)
    ckpt = tr.save_checkpoint()
    again = Trainer(_cfg(tmp_path, ema_decay=0.5), images=imgs, eval_images=[])
    again.load_checkpoint(ckpt)
    assert again.ema_updates == 3
    for a, b in zip(again.ema_model.parameters(), averaged):
        assert torch.equal(a, b)
    # a checkpoint without an average (older runs) starts one at its weights
    state = torch.load(ckpt, weights_only=True)
    state["ema"] = None
    older = Trainer(_cfg(tmp_path, ema_decay=0.5), images=imgs, eval_images=[])
    older.load_state_dict(state)
    for a, t in zip(older.ema_model.parameters(), older.model.parameters()):
        assert torch.equal(a, t)
    off = Trainer(_cfg(tmp_path, ema_decay=0.0), images=imgs, eval_images=[])
    assert off.ema_model is None and off.export_model is off.model
