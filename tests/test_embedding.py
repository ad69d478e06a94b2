"""Product-quantized embedding tables: k-means quality, exact archive round trips,
the compact module, task-aware fine-tuning, hostile archives."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ncz.format as nf
from ncz.format import Codec, Kind, encode_payload
from ncz.models import Recipe, load_into, load_state_dict, pack
from ncz.models.codebook import CodebookEmbedding, encode_codebook, product_quantize, reconstruct
from ncz.models.codebook.pq import assign_stages
from ncz.models.embedding import finetune_codebooks, packable_state_dict

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small models: tests/conftest.py says why


def _clustered(rows: int = 600, dim: int = 32, seed: int = 0) -> torch.Tensor:
    """Rows with structure (low rank + clusters + noise), like a trained table."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(6, dim, generator=g)
    centers = torch.randn(20, dim, generator=g)
    mix = torch.randn(rows, 6, generator=g) @ basis * 0.5
    return mix + centers[torch.randint(20, (rows,), generator=g)] + 0.1 * torch.randn(rows, dim, generator=g)


def _err(table: torch.Tensor, **kw) -> float:
    books, codes = product_quantize(table, **kw)
    return float((reconstruct(books, codes) - table).norm() / table.norm())


def _codebook_recipe(**options) -> Recipe:
    return Recipe.from_dict({"rule": [{"pattern": "*emb*.weight", "representation": "codebook", **options},
                                      {"pattern": "*", "representation": "lossless"}]})


# --- k-means quality ----------------------------------------------------------------------


def test_error_decreases_with_centroids_and_subspaces():
    table = _clustered()
    by_k = [_err(table, subspaces=4, centroids=k) for k in (4, 16, 64)]
    by_m = [_err(table, subspaces=m, centroids=16) for m in (2, 4, 8)]
    for errors in (by_k, by_m):
        for coarse, fine in zip(errors, errors[1:]):
            assert fine < 0.9 * coarse, errors
    # a second (residual) stage at the same M, K removes a good share of what is left
    assert _err(table, subspaces=4, centroids=16, stages=2) < 0.85 * by_k[1]
    # k-means is far better than codebooks of random rows at the same size
    books, _ = product_quantize(table, subspaces=4, centroids=16, iterations=0)
    random_err = float((reconstruct(books, assign_stages(table, books)) - table).norm() / table.norm())
    assert by_k[1] < 0.9 * random_err


def test_exact_when_subvectors_take_few_values():
    """≤ K distinct subvectors per subspace: k-means++ seeds each of them, error 0."""
    g = torch.Generator().manual_seed(3)
    atoms = torch.randn(4, 8, 4, generator=g)  # 4 subspaces × 8 distinct values
    choice = torch.randint(8, (300, 4), generator=g)
    table = torch.cat([atoms[m, choice[:, m]] for m in range(4)], dim=1)
    books, codes = product_quantize(table, subspaces=4, centroids=8)
    assert torch.equal(reconstruct(books, codes), table)


def test_codes_are_relabelled_by_usage_and_encoding_is_deterministic(tmp_path):
    table = _clustered(seed=5)
    books, codes = product_quantize(table, subspaces=4, centroids=16)
    for j in range(codes.shape[1]):
        counts = torch.bincount(codes[:, j], minlength=16)
        assert bool((counts[:-1] >= counts[1:]).all())
    pack({"emb.weight": table}, tmp_path / "a.ncz", recipe=_codebook_recipe(subspaces=4, centroids=16))
    pack({"emb.weight": table}, tmp_path / "b.ncz", recipe=_codebook_recipe(subspaces=4, centroids=16))
    assert (tmp_path / "a.ncz").read_bytes() == (tmp_path / "b.ncz").read_bytes()


# --- archive round trips ------------------------------------------------------------------


@pytest.mark.parametrize("storage", ["float32", "float16", "quantized"])
def test_codes_round_trip_exactly(tmp_path, storage):
    table = _clustered(seed=1)
    books, codes = product_quantize(table, subspaces=8, centroids=32, stages=2)
    path = tmp_path / "c.ncz"
    report = pack({"emb.weight": table}, path, recipe=_codebook_recipe(fixed=(books, codes), codebook=storage))
    with nf.open(path) as reader:
        stored = np.frombuffer(reader.read("emb.weight#codes"), dtype="<i4").reshape(codes.shape)
        head = reader.info("emb.weight")
        assert head.kind == Kind.CODEBOOK
        assert {k: head.params[k] for k in ("M", "K", "stages", "codebook")} == \
            {"M": 8, "K": 32, "stages": 2, "codebook": storage}
    assert np.array_equal(stored, codes.numpy())
    back = load_state_dict(path)["emb.weight"]
    if storage == "float32":
        assert torch.equal(back, reconstruct(books, codes))  # bit-exact
    else:
        drift = float((back - reconstruct(books, codes)).norm() / reconstruct(books, codes).norm())
        assert drift < (2e-3 if storage == "float16" else 0.012)
    # the reported error is the decoded table's
    assert report.tensors[0].rel_error == pytest.approx(float((back - table).norm() / table.norm()), rel=1e-6)


def test_size_and_error_beat_scalar_quantization(tmp_path):
    from ncz.models.quantized import encode_quantized

    table = _clustered(rows=2000, dim=64, seed=2)
    path = tmp_path / "s.ncz"
    report = pack({"emb.weight": table}, path, recipe=_codebook_recipe(subspaces=8, centroids=64))
    pq = report.tensors[0]
    raw_code_bytes = 2000 * 8 * 6 / 8  # log2(64) = 6 bits per code
    assert pq.stored_bytes < raw_code_bytes + 64 * 64 * 1.2  # codebooks at ≤ ~9.6 bits per value
    assert path.stat().st_size < 0.1 * table.numel() * 4
    # scalar quantization at 1 bit/weight (entropy coded) is larger and worse on row-structured tables
    scalar = encode_quantized("emb.weight", table, bits=1.0)
    assert pq.stored_bytes < scalar.stored_bytes and pq.rel_error < 0.8 * scalar.rel_error


# --- the compact module -------------------------------------------------------------------


class _Tagger(nn.Module):
    def __init__(self, vocab: int = 1000, dim: int = 48, classes: int = 5, padding_idx: int | None = 0):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=padding_idx)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids).mean(1))


@pytest.mark.parametrize("centroids,stages,dtype", [(64, 1, torch.float32), (300, 2, torch.float32),
                                                    (16, 1, torch.float16)])
def test_module_rows_equal_decoded_table(tmp_path, centroids, stages, dtype):
    torch.manual_seed(0)
    model = _Tagger().to(dtype)
    path = tmp_path / "m.ncz"
    pack(model.state_dict(), path, recipe=_codebook_recipe(subspaces=6, centroids=centroids, stages=stages,
                                                            iterations=5))
    dense = load_state_dict(path)["emb.weight"]
    assert dense.dtype == dtype
    fresh = _Tagger().to(dtype)
    load_into(fresh, path)
    assert isinstance(fresh.emb, CodebookEmbedding)
    assert fresh.emb.codes.dtype == (torch.uint8 if centroids <= 256 else torch.int16)
    ids = torch.randint(1000, (7, 13))
    out = fresh.emb(ids)
    assert out.dtype == dtype and out.shape == (7, 13, 48)
    assert torch.equal(out, dense[ids])
    assert torch.equal(fresh.emb.dense(), dense)


def test_load_into_swaps_embedding_and_parameter_bytes_drop(tmp_path):
    torch.manual_seed(1)
    model = _Tagger(vocab=4000, dim=64, padding_idx=0)
    path = tmp_path / "m.ncz"
    pack(model.state_dict(), path, recipe=_codebook_recipe(subspaces=8, centroids=64, iterations=5))
    fresh = _Tagger(vocab=4000, dim=64, padding_idx=0)
    report = load_into(fresh, path)
    assert report.factorized == ["emb"]
    assert isinstance(fresh.emb, CodebookEmbedding) and fresh.emb.padding_idx == 0
    # 4000×64 float32 (1 MB) → 64×64 float32 codebooks + 4000×8 uint8 codes (~48 KB)
    assert report.parameter_bytes_after < 0.1 * report.parameter_bytes_before
    assert torch.equal(fresh.head.weight, model.head.weight)
    ids = torch.randint(4000, (3, 9))
    with torch.no_grad():
        assert fresh(ids).shape == (3, 5)
    # a model of another shape is refused with the tensor named
    with pytest.raises(nf.InputError, match="emb.weight"):
        load_into(_Tagger(vocab=3999, dim=64), path)


def test_packable_state_dict_stores_a_tuned_module_as_is(tmp_path):
    torch.manual_seed(2)
    model = _Tagger(vocab=500, dim=32)
    books, codes = product_quantize(model.emb.weight, subspaces=4, centroids=16)
    model.emb = CodebookEmbedding(books, codes, padding_idx=0)
    state, recipe = packable_state_dict(model, "lossless", codebook="float32")
    assert set(state) == {"emb.weight", "head.weight", "head.bias"}
    path = tmp_path / "t.ncz"
    pack(state, path, recipe=recipe)
    fresh = _Tagger(vocab=500, dim=32)
    load_into(fresh, path)
    assert torch.equal(fresh.emb.codes, model.emb.codes)
    assert torch.equal(fresh.emb.codebooks, model.emb.codebooks)


# --- task-aware fine-tuning ----------------------------------------------------------------


def _teacher_task(seed: int = 0):
    """Labels from a random 'teacher' bag-of-words model; the student starts as the teacher."""
    g = torch.Generator().manual_seed(seed)
    vocab, dim, classes = 400, 16, 6
    model = _Tagger(vocab=vocab, dim=dim, classes=classes, padding_idx=None)
    with torch.no_grad():
        model.emb.weight.copy_(torch.randn(vocab, dim, generator=g))
        model.head.weight.copy_(torch.randn(classes, dim, generator=g) * 2)
        model.head.bias.zero_()
    ids = torch.randint(vocab, (3000, 4), generator=g)
    with torch.no_grad():
        labels = model(ids).argmax(1)
    train = [(ids[i:i + 50], labels[i:i + 50]) for i in range(0, 2000, 50)]
    return model, train, (ids[2000:], labels[2000:])


def _task_loss(model, batch) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


# ratios seen: 0.74 (straight-through), 0.72 (gumbel); 1.0 when nothing is learned (lr 1e-7)
@pytest.mark.parametrize("method,factor", [("straight-through", 0.85), ("gumbel", 0.9)])
def test_task_aware_finetuning_beats_post_training(method, factor):
    model, train, held_out = _teacher_task()
    with torch.no_grad():
        full = float(_task_loss(model.eval(), held_out))
    books, codes = product_quantize(model.emb.weight, subspaces=2, centroids=8, seed=0)
    ptq = copy.deepcopy(model)
    ptq.emb = CodebookEmbedding(books, codes)
    with torch.no_grad():
        ptq_loss = float(_task_loss(ptq.eval(), held_out))
    assert ptq_loss > 1.5 * full  # the budget really hurts the task

    steps = []
    tuned = finetune_codebooks(copy.deepcopy(model), "emb", _task_loss, train, steps=240, lr=0.03, method=method,
                               codebooks=books, train_rest=False, seed=0,
                               progress=lambda step, total, text: steps.append(step))
    assert steps == list(range(1, 241))
    assert isinstance(tuned.emb, CodebookEmbedding) and tuned.emb.codebooks.shape == books.shape
    assert torch.equal(tuned.head.weight, model.head.weight)  # train_rest=False: only the codebooks learned
    with torch.no_grad():
        tuned_loss = float(_task_loss(tuned.eval(), held_out))
    assert tuned_loss < factor * ptq_loss, (full, ptq_loss, tuned_loss)


def test_lr_lambda_scales_every_learning_rate():
    """A zero multiplier from the first step trains nothing: codebooks and the rest stay as initialized."""
    model, train, _ = _teacher_task()
    books, _ = product_quantize(model.emb.weight, subspaces=2, centroids=8, seed=0)
    frozen = finetune_codebooks(copy.deepcopy(model), "emb", _task_loss, train, steps=5, lr=0.1, codebooks=books,
                                lr_lambda=lambda step: 0.0)
    assert torch.equal(frozen.emb.codebooks, books) and torch.equal(frozen.head.weight, model.head.weight)
    moved = finetune_codebooks(copy.deepcopy(model), "emb", _task_loss, train, steps=5, lr=0.1, codebooks=books,
                               lr_lambda=lambda step: 1.0 - step / 5)
    assert not torch.equal(moved.emb.codebooks, books)


@pytest.mark.parametrize("method", ["straight-through", "gumbel"])
def test_finetune_resumes_from_its_checkpoint_as_one_run(tmp_path, method):
    """Interrupted after a checkpoint and started again, the run ends where an uninterrupted one does."""
    model, train, _ = _teacher_task()
    books, _ = product_quantize(model.emb.weight, subspaces=2, centroids=8, seed=0)
    options = dict(steps=12, lr=0.03, method=method, codebooks=books, seed=0, lr_lambda=lambda s: 1 - s / 12)
    torch.manual_seed(1)
    straight = finetune_codebooks(copy.deepcopy(model), "emb", _task_loss, train, **options)

    class Stop(Exception):
        pass

    calls = []

    def interrupted(m, batch):
        calls.append(1)
        if len(calls) == 11:
            raise Stop
        return _task_loss(m, batch)

    state = tmp_path / "qat.pt"
    torch.manual_seed(1)
    with pytest.raises(Stop):
        finetune_codebooks(copy.deepcopy(model), "emb", interrupted, train, checkpoint=state, checkpoint_every=4,
                           **options)
    assert torch.load(state, weights_only=False)["step"] == 8
    steps = []
    resumed = finetune_codebooks(copy.deepcopy(model), "emb", _task_loss, train, checkpoint=state,
                                 checkpoint_every=4, progress=lambda step, total, text: steps.append(step), **options)
    assert steps == [9, 10, 11, 12]
    assert torch.equal(resumed.emb.codes, straight.emb.codes)
    assert torch.equal(resumed.emb.codebooks, straight.emb.codebooks)
    assert torch.equal(resumed.head.weight, straight.head.weight)


def test_finetune_rejects_bad_arguments():
    model, train, _ = _teacher_task()
    with pytest.raises(nf.UsageError):
        finetune_codebooks(model, "emb", _task_loss, train, steps=1, lr=0.1, method="annealing")
    with pytest.raises(nf.UsageError):
        finetune_codebooks(model, "head", _task_loss, train, steps=1, lr=0.1, subspaces=2, centroids=4)
    with pytest.raises(nf.UsageError):
        finetune_codebooks(model, "nothing", _task_loss, train, steps=1, lr=0.1)
    with pytest.raises(nf.UsageError):
        finetune_codebooks(model, "emb", _task_loss, train, steps=1, lr=0.1, checkpoint_every=0)
    with pytest.raises(nf.UsageError):
        encode_codebook("t", torch.randn(10, 9), subspaces=2)


# --- hostile archives ---------------------------------------------------------------------


def _valid(tmp_path, storage: str = "float16"):
    table = _clustered(rows=200, dim=16, seed=4)
    path = tmp_path / "ok.ncz"
    pack({"emb.weight": table}, path, recipe=_codebook_recipe(subspaces=4, centroids=8, codebook=storage))
    return path


def _rewrite(src, dst, *, params=None, parts=None, drop=()):
    """Copy a model archive, changing the head's params, replacing or dropping parts."""
    with nf.open(src) as reader, nf.Writer(dst, metadata=reader.metadata) as w:
        for info in reader.sections:
            if info.name in drop:
                continue
            if parts and info.name in parts:
                payload, part_params = parts[info.name]
                w.add_encoded(info.name, payload, kind=Kind.PART, params=part_params)
            elif params and info.name == "emb.weight":
                w.add_stored(info.name, bytes(reader.stored(info.name)), decoded_length=info.decoded_length,
                             kind=info.kind, codec=info.codec, params={**info.params, **params})
            else:
                w.add_stored(info.name, bytes(reader.stored(info.name)), decoded_length=info.decoded_length,
                             kind=info.kind, codec=info.codec, params=info.params)
    return dst


def _codes_of(path) -> np.ndarray:
    with nf.open(path) as reader:
        info = reader.info("emb.weight#codes")
        return np.frombuffer(reader.read(info.name), dtype="<i4").reshape(info.params["shape"]).copy()


@pytest.mark.parametrize("change,match", [
    ({"M": 3}, "does not divide"),
    ({"M": True}, "params.M"),
    ({"K": 0}, "params.K"),
    ({"K": 4}, "codes must lie"),  # codes up to 7 no longer fit
    ({"stages": 2}, "codes have shape"),
    ({"stages": "1"}, "params.stages"),
    ({"shape": [201, 16]}, "codes have shape"),
    ({"shape": [200, 32]}, "codebooks have shape"),
    ({"shape": [200]}, "params.shape"),
    ({"dtype": "int32"}, "params.dtype"),
    ({"codebook": "float8"}, "params.codebook"),
    ({"codebook": "float32"}, "dtype 'float16', expected 'float32'"),
])
def test_hostile_head_params_are_refused(tmp_path, change, match):
    bad = _rewrite(_valid(tmp_path), tmp_path / "bad.ncz", params=change)
    with pytest.raises(nf.FormatError, match=match):
        load_state_dict(bad)
    with pytest.raises(nf.FormatError):
        load_into(_Tagger(vocab=200, dim=16), bad)


def test_hostile_parts_are_refused(tmp_path):
    path = _valid(tmp_path)
    codes = _codes_of(path)
    shape = list(codes.shape)

    def codes_part(values: np.ndarray, part_shape=None):
        return (encode_payload(values.astype("<i4").tobytes(), Codec.ANS),
                {"dtype": "int32", "shape": part_shape or list(values.shape)})

    big = codes.copy()
    big[17, 2] = 8  # = K
    negative = codes.copy()
    negative[0, 0] = -1
    cases = [
        ({"emb.weight#codes": codes_part(big)}, "codes must lie in 0..7"),
        ({"emb.weight#codes": codes_part(negative)}, "codes must lie"),
        ({"emb.weight#codes": codes_part(codes[:-1])}, "codes have shape"),
        ({"emb.weight#codes": codes_part(codes.reshape(-1), [codes.size])}, "codes have shape"),
        ({"emb.weight#codebooks": (encode_payload(np.full((1, 4, 8, 4), np.inf, "<f2").tobytes(), Codec.RAW),
                                   {"dtype": "float16", "shape": [1, 4, 8, 4]})}, "NaN or inf"),
        ({"emb.weight#codebooks": (encode_payload(np.zeros((1, 4, 7, 4), "<f2").tobytes(), Codec.RAW),
                                   {"dtype": "float16", "shape": [1, 4, 7, 4]})}, "codebooks have shape"),
    ]
    assert shape == [200, 4]
    for index, (parts, match) in enumerate(cases):
        bad = _rewrite(path, tmp_path / f"bad{index}.ncz", parts=parts)
        with pytest.raises(nf.FormatError, match=match):
            load_state_dict(bad)
    bad = _rewrite(path, tmp_path / "nocodes.ncz", drop={"emb.weight#codes"})
    with pytest.raises(nf.FormatError, match="lacks its part"):
        load_state_dict(bad)


def test_hostile_quantized_codebooks_are_refused(tmp_path):
    path = _valid(tmp_path, storage="quantized")
    assert torch.isfinite(load_state_dict(path)["emb.weight"]).all()
    steps = (encode_payload(np.ones((3, 1), "<f4").tobytes(), Codec.RAW), {"dtype": "float32", "shape": [3, 1]})
    with pytest.raises(nf.FormatError, match="steps have shape"):
        load_state_dict(_rewrite(path, tmp_path / "b1.ncz", parts={"emb.weight#steps": steps}))
    q = (encode_payload(np.zeros((4, 31), "<i4").tobytes(), Codec.ZSTD), {"dtype": "int32", "shape": [4, 31]})
    with pytest.raises(nf.FormatError, match="quantized codebooks have shape"):
        load_state_dict(_rewrite(path, tmp_path / "b2.ncz", parts={"emb.weight#codebooks": q}))
    nan = (encode_payload(np.full((4, 1), np.nan, "<f4").tobytes(), Codec.RAW), {"dtype": "float32", "shape": [4, 1]})
    with pytest.raises(nf.FormatError, match="NaN or inf"):
        load_state_dict(_rewrite(path, tmp_path / "b3.ncz", parts={"emb.weight#steps": nan}))
    with pytest.raises(nf.FormatError, match="lacks its part"):
        load_state_dict(_rewrite(path, tmp_path / "b4.ncz", drop={"emb.weight#steps"}))
