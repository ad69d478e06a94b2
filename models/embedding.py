"""Task-aware product quantization of an embedding: the codebooks trained with the task's loss.

Shu & Nakayama ("Compressing Word Embeddings via
Deep Compositional Code Learning", ICLR 2018) and DPQ (Chen et al.,
"Differentiable Product Quantization for End-to-End Embedding Compression",
ICML 2020) learn the codes/codebooks with the downstream loss; Sathyendra et
al. ("Extreme Model Compression for On-device Natural Language Understanding",
COLING 2020) combine PQ of the embedding table with quantization of the rest
and task-aware fine-tuning for ~97 % smaller NLU models at < 4 % accuracy loss.

The product quantization and the ``CODEBOOK`` representation live in
:mod:`ncz.models.codebook`; this module trains them. :func:`finetune_codebooks`
learns the codebooks (and optionally the rest of the model) with straight-through
nearest-centroid codes or annealed Gumbel-softmax assignments (DPQ's SX / gumbel
variants); :func:`packable_state_dict` packs a model holding
:class:`~ncz.models.codebook.CodebookEmbedding` modules. On CLINC150
(``bench/nlu_embedding.py``) PQ M = 8, K = 256 with task-aware straight-through
fine-tuning made the whole intent model 97.3 % smaller than fp32 at −1.5 accuracy
points (post-training PQ alone: −8.0 points).
"""

from __future__ import annotations

import glob
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ncz.format import UsageError

from .codebook import CodebookEmbedding, encode_codebook, product_quantize, reconstruct
from .codebook.pq import assign, assign_stages, distances, split_subspaces
from .recipe import Recipe, Rule
from .representation import Progress

__all__ = [
    "finetune_codebooks",
    "packable_state_dict",
    # the representation itself, for callers of ncz.models.embedding from before the split
    "CodebookEmbedding",
    "encode_codebook",
    "product_quantize",
    "reconstruct",
]


class _TrainablePQ(nn.Module):
    """An embedding trained through its product quantization (DPQ, Chen et al. 2020).

    Keeps a continuous table ``e`` (the DPQ "query") and trainable codebooks.
    Forward quantizes the looked-up rows stage by stage:

    - ``straight-through``: nearest centroid; output ``q + e − sg(e)`` — the
      value is the quantized row, the task gradient reaches both the chosen
      centroids and ``e`` (so codes move when ``e`` crosses a cell border);
    - ``gumbel``: soft assignment ``softmax((−‖r − c‖²/scale + g)/τ)`` with
      Gumbel noise g (Jang et al. 2017), τ annealed geometrically; the last
      ``hard_fraction`` of the steps uses the noise-free nearest centroid with a
      straight-through gradient, i.e. exactly the codes the final model will
      hold (on CLINC150 the soft phase alone left a train/test mismatch: a
      longer hard phase did better, and plain straight-through best).

    A commitment term ‖e − sg(q)‖² / ‖sg(e)‖² (VQ-VAE, van den Oord et al. 2017)
    keeps ``e`` near its cell so the final nearest-centroid codes agree with training.
    """

    def __init__(self, weight: torch.Tensor, codebooks: torch.Tensor, *, method: str, padding_idx: int | None,
                 commitment: float, scales: list[float], seed: int):
        super().__init__()
        self.e = nn.Parameter(weight.detach().float().clone())
        self.codebooks = nn.Parameter(codebooks.detach().float().clone())
        self.method = method
        self.padding_idx = padding_idx
        self.commitment = commitment
        self.scales = scales
        self.tau = 1.0
        self.hard = method == "straight-through"
        self.aux = torch.zeros((), device=self.e.device)
        self.generator = torch.Generator(device=self.e.device).manual_seed(seed)
        if padding_idx is not None:  # as nn.Embedding: the padding row gets no gradient
            self.e.register_hook(lambda grad: grad.index_fill(0, torch.tensor([padding_idx], device=grad.device), 0))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        unique, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
        e = self.e[unique]
        s, m, k, sub = self.codebooks.shape
        residual = e
        total = torch.zeros_like(e)
        for stage in range(s):
            parts = residual.reshape(-1, m, sub).transpose(0, 1)  # [M, n, sub]
            book = self.codebooks[stage]  # [M, K, sub]
            if self.hard:
                with torch.no_grad():
                    index = distances(parts, book).argmin(-1)  # [M, n]
                q = torch.gather(book, 1, index.unsqueeze(-1).expand(-1, -1, sub))
            else:
                d2 = (parts.square().sum(-1, keepdim=True) - 2 * parts @ book.transpose(1, 2)
                      + book.square().sum(-1).unsqueeze(1))  # [M, n, K], differentiable
                u = torch.rand(d2.shape, generator=self.generator, device=d2.device).clamp_(1e-10, 1 - 1e-10)
                logits = (-d2 / self.scales[stage] - torch.log(-torch.log(u))) / self.tau
                q = torch.softmax(logits, -1) @ book
            q = q.transpose(0, 1).reshape(-1, m * sub)
            total = total + q
            residual = e - total
        out = total + e - e.detach() if self.hard else total
        denom = e.detach().square().mean().clamp_min(1e-12)
        self.aux = self.aux + self.commitment * (e - total.detach()).square().mean() / denom
        return out[inverse].reshape(*ids.shape, m * sub)


def _module_name(model: nn.Module, name: str) -> str:
    if name.endswith(".weight"):
        name = name[: -len(".weight")]
    try:
        model.get_submodule(name)
    except AttributeError:
        raise UsageError(f"the model has no module {name!r}") from None
    return name


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def finetune_codebooks(model: nn.Module, embedding_name: str, loss_fn: Callable[[nn.Module, Any], torch.Tensor],
                       data_iter: Iterable, *, steps: int, lr: float, method: str = "straight-through",
                       subspaces: int | None = None, centroids: int = 256, stages: int = 1,
                       codebooks: torch.Tensor | None = None, train_rest: bool = True, rest_lr: float | None = None,
                       commitment: float = 0.25, tau: tuple[float, float] = (1.0, 0.05), hard_fraction: float = 0.5,
                       iterations: int = 20, seed: int = 0, progress: Progress | None = None,
                       lr_lambda: Callable[[int], float] | None = None, checkpoint: str | Path | None = None,
                       checkpoint_every: int = 50) -> nn.Module:
    """Learn the embedding's product quantization jointly with the task; returns ``model``.

    The embedding ``embedding_name`` (an ``nn.Embedding``, or a
    :class:`CodebookEmbedding` to continue from) is initialized by k-means
    (:func:`product_quantize` with ``subspaces``, ``centroids``, ``stages``) or
    from the given ``codebooks`` ``[S, M, K, d/M]``,
    replaced by a differentiable PQ embedding (see :class:`_TrainablePQ` for
    ``method`` = ``"straight-through"`` or ``"gumbel"``) and trained with Adam on
    ``loss_fn(model, batch)`` + the commitment term for ``steps`` batches of
    ``data_iter`` (re-iterated when it runs out, if it can be). With
    ``train_rest`` the other parameters train too (at ``rest_lr``, default
    ``lr``). Afterwards every row gets its nearest-centroid codes and the module
    is swapped, in place, for a :class:`CodebookEmbedding`; the model keeps its
    train/eval mode. ``progress(step, steps, "loss …")`` is called per step. ``lr_lambda(step)``
    multiplies every learning rate (``torch.optim.lr_scheduler.LambdaLR``), e.g. a linear decay so
    that the last steps settle the codes rather than keep moving them.

    With ``checkpoint`` (a file path) the run is resumable: every ``checkpoint_every`` steps the
    model (trainable PQ included), optimizer, schedule and random state are saved there (written
    to a temporary name, then renamed), and a run that finds the file continues from its step,
    skipping the batches already used so that ``data_iter`` is consumed as in one run. State that
    lives outside the model (e.g. :class:`~ncz.models.QuantAware`'s steps) is the caller's to
    recompute on the first ``loss_fn`` call. The file is a trusted training artefact, not an archive.
    """
    if checkpoint_every < 1:
        raise UsageError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    if method not in ("straight-through", "gumbel"):
        raise UsageError(f"method must be 'straight-through' or 'gumbel', got {method!r}")
    if steps < 0 or lr <= 0:
        raise UsageError("steps must be ≥ 0 and lr > 0")
    if not (0 <= hard_fraction <= 1 and tau[0] > 0 and tau[1] > 0):
        raise UsageError("hard_fraction must lie in [0, 1] and both temperatures be > 0")
    name = _module_name(model, embedding_name)
    original = model.get_submodule(name)
    if isinstance(original, CodebookEmbedding):
        weight, books = original.dense().detach().float(), original.codebooks.detach()
        padding_idx, max_norm, norm_type = original.padding_idx, original.max_norm, original.norm_type
        dtype = original.dtype
    elif isinstance(original, nn.Embedding):
        weight = original.weight.detach().float()
        if codebooks is not None:
            books = torch.as_tensor(codebooks).detach().float().to(weight.device)
            if books.dim() != 4 or books.shape[1] * books.shape[3] != weight.shape[1]:
                raise UsageError(f"codebooks {list(books.shape)} do not fit the table {list(weight.shape)}")
        else:  # k-means runs on the CPU (seeded, deterministic)
            books, _ = product_quantize(weight.cpu(), subspaces=subspaces, centroids=centroids, stages=stages,
                                        iterations=iterations, seed=seed)
            books = books.to(weight.device)
        padding_idx, max_norm, norm_type, dtype = (original.padding_idx, original.max_norm, original.norm_type,
                                                   original.weight.dtype)
    else:
        raise UsageError(f"{name!r} is a {type(original).__name__}, not an nn.Embedding")
    # per-stage distance scale for the Gumbel logits: the mean squared error of the initial assignment
    scales, residual = [], weight
    for stage in range(books.shape[0]):
        codes, dist = assign(split_subspaces(residual, books.shape[1]), books[stage])
        scales.append(float(dist.mean().clamp_min(1e-12)))  # per subspace, as the logits see it
        residual = residual - reconstruct(books[stage:stage + 1], codes.t().contiguous())
    pq = _TrainablePQ(weight, books, method=method, padding_idx=padding_idx, commitment=commitment,
                      scales=scales, seed=seed)
    _set_module(model, name, pq)
    own = [pq.e, pq.codebooks]
    groups = [{"params": own, "lr": lr}]
    if train_rest:
        rest = [p for p in model.parameters() if p.requires_grad and all(p is not o for o in own)]
        if rest:
            groups.append({"params": rest, "lr": rest_lr if rest_lr is not None else lr})
    optimizer = torch.optim.Adam(groups)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda) if lr_lambda is not None else None
    was_training = model.training
    model.train()
    iterator = iter(data_iter)
    start = 0
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    if checkpoint is not None and checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=True)  # tensors, numbers and lists only: nothing to unpickle
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        if schedule is not None:
            schedule.load_state_dict(saved["schedule"])
        torch.set_rng_state(saved["rng"])
        pq.generator.set_state(saved["generator"])
        start = min(int(saved["step"]), steps)
        for _ in range(start):  # the batches the saved run already trained on
            try:
                next(iterator)
            except StopIteration:
                iterator = iter(data_iter)
    try:
        for step in range(start, steps):
            try:
                batch = next(iterator)
            except StopIteration:
                iterator = iter(data_iter)
                try:
                    batch = next(iterator)
                except StopIteration:
                    break  # a one-shot iterator ran out
            fraction = step / max(steps, 1)
            if method == "gumbel":
                pq.hard = fraction >= 1 - hard_fraction
                pq.tau = tau[0] * (tau[1] / tau[0]) ** min(1.0, fraction / max(1e-9, 1 - hard_fraction))
            pq.aux = torch.zeros((), device=pq.e.device)
            loss = loss_fn(model, batch)
            optimizer.zero_grad(set_to_none=True)
            (loss + pq.aux).backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
            if progress:
                progress(step + 1, steps, f"loss {float(loss.detach()):.4f}")
            if checkpoint is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
                temporary = checkpoint.with_name(checkpoint.name + ".tmp")
                torch.save({"step": step + 1, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "schedule": schedule.state_dict() if schedule is not None else None,
                            "rng": torch.get_rng_state(), "generator": pq.generator.get_state()}, temporary)
                temporary.replace(checkpoint)
    finally:
        with torch.no_grad():
            books = pq.codebooks.detach().clone()
            codes = assign_stages(pq.e.detach(), books)
        module = CodebookEmbedding(books, codes, padding_idx=padding_idx, max_norm=max_norm, norm_type=norm_type,
                                   dtype=dtype)
        _set_module(model, name, module)
        model.train(was_training)
    return model


def packable_state_dict(model: nn.Module, recipe: Recipe | str = "lossless",
                        **options: Any) -> tuple[dict[str, torch.Tensor], Recipe]:
    """A state dict and recipe that :func:`ncz.models.pack` stores a model with
    :class:`CodebookEmbedding` modules from: each such module ``name`` becomes a
    dense ``name.weight`` (what an ``nn.Embedding`` model expects, so
    :func:`ncz.models.load_into` fits it) whose rule stores the module's own
    codebooks and codes (``fixed``), with ``options`` (e.g. ``codebook="float16"``)
    passed to :func:`encode_codebook`. Other tensors follow ``recipe``.
    """
    base = Recipe.preset(recipe) if isinstance(recipe, str) else recipe
    modules = {n: mod for n, mod in model.named_modules() if isinstance(mod, CodebookEmbedding)}
    state: dict[str, torch.Tensor] = {}
    rules = []
    for key, value in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in modules and leaf in ("codebooks", "codes"):
            if leaf == "codebooks":
                module = modules[owner]
                weight_name = f"{owner}.weight" if owner else "weight"
                state[weight_name] = module.dense().detach()
                rules.append(Rule(glob.escape(weight_name), "codebook", {**options, "fixed": module}))
            continue
        state[key] = value
    return state, Recipe(f"{base.name}+codebooks", tuple(rules) + base.rules)

