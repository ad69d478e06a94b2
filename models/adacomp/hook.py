"""The DDP communication hook: AdaComp on every gradient bucket, its state and statistics.

Data flow in the DDP hook (:func:`adacomp_hook`)
-----------------------------------------------
For each gradient bucket DDP hands us:

* layer type per parameter from ``param.ndim``: ``>= 3`` -> ``"conv"``,
  ``2`` -> ``"linear_lstm"`` (Linear, LSTM, Embedding matrices), ``<= 1`` ->
  ``"other"`` (biases, norm scales);
* each parameter's slice of the flat bucket (slices follow parameter order) is
  compressed with its own bin length against the bucket's float32 residue
  (kept in :class:`AdaCompState`, keyed by bucket index);
* each slice becomes a :class:`SparseMessage`, serialized by
  :func:`encode_message`; the bucket payload frames the messages;
* payload sizes are exchanged with ``all_gather`` (int64), then the payloads,
  zero-padded to the largest, with a second ``all_gather`` (uint8, on the
  bucket's device so NCCL works too);
* every rank decodes every payload in rank order (so all replicas compute a
  bit-identical sum), sums the dequantized sparse updates densely, divides by
  the world size and writes the result into the bucket buffer;
* a completed :class:`torch.futures.Future` holding the buffer is returned.

The first ``warmup_steps`` steps use a plain all-reduce. Besides letting the
model leave its most chaotic phase uncompressed, at least one plain step keeps
residues from being keyed to DDP's initial bucket layout: DDP rebuilds its
buckets after the first iteration (the same reason PowerSGD requires
``start_powerSGD_iter > 1``).
"""

# No `from __future__ import annotations` here: DDP checks that the hook's bucket parameter is
# annotated with the class dist.GradBucket itself, not a string.
import dataclasses
import warnings
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import torch
import torch.distributed as dist

from ncz.format import InputError, UsageError

from .compressor import LAYER_TYPES, AdaCompCompressor, AdaCompConfig, layer_type_of
from .wire import decode_message, encode_message, frame, unframe

__all__ = ["LayerBytes", "StepStats", "AdaCompState", "adacomp_hook", "register_adacomp"]

_STATE_VERSION: Final[int] = 1


@dataclass
class LayerBytes:
    """Byte counters for one layer type.

    ``dense_bytes`` is what a plain fp32 all-reduce would contribute per
    worker (4 * numel); ``wire_bytes`` is this worker's encoded messages
    including the 4-byte frame per message; ``numel`` and ``sent`` count
    elements (``sent`` = number of transmitted entries).
    """

    dense_bytes: int = 0
    wire_bytes: int = 0
    numel: int = 0
    sent: int = 0

    def add(self, other: "LayerBytes") -> None:
        self.dense_bytes += other.dense_bytes
        self.wire_bytes += other.wire_bytes
        self.numel += other.numel
        self.sent += other.sent

    @property
    def compression_rate(self) -> float:
        """Dense fp32 bytes / wire bytes (``nan`` if nothing was sent)."""
        return self.dense_bytes / self.wire_bytes if self.wire_bytes else float("nan")


@dataclass
class StepStats:
    """Per-step statistics, aggregated over the buckets of one step.

    ``payload_bytes`` is the exact bucket payloads this worker produced
    (message frames + the 4-byte count per bucket); ``gathered_bytes`` what it
    actually pushed through ``all_gather`` (payload zero-padded to the largest
    peer payload, plus the 8-byte length exchange) -- an artefact of using
    equal-size all-gather rather than a variable-size collective.
    """

    step: int
    warmup: bool
    by_type: dict[str, LayerBytes] = field(default_factory=lambda: {t: LayerBytes() for t in LAYER_TYPES})
    payload_bytes: int = 0
    gathered_bytes: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "warmup": self.warmup,
            "payload_bytes": self.payload_bytes,
            "gathered_bytes": self.gathered_bytes,
            "by_type": {t: dataclasses.asdict(b) for t, b in self.by_type.items()},
        }


class AdaCompState:
    """Per-worker state of :func:`adacomp_hook`.

    Holds the float32 residue of every bucket (keyed by ``bucket.index()``),
    the step counter, the configuration and the statistics used for logging.

    Attributes:
        config: the :class:`AdaCompConfig`.
        process_group: group for the collectives (``None`` = default group).
        step: number of completed optimizer steps seen by the hook.
        residues: bucket index -> flat float32 residue on the bucket's device.
        totals: cumulative :class:`LayerBytes` per layer type over compressed
            (post warm-up) steps; the AdaComp compression rate.
        warmup_bytes: dense bytes sent during warm-up.
        history: recent :class:`StepStats` (at most ``config.history_len``).
        bucket_stats: bucket index -> latest per-bucket :class:`StepStats`.
        residue_resets: how often a residue was dropped because the bucket
            layout under an index changed (should stay 0, see warm-up).
    """

    def __init__(self, config: AdaCompConfig | None = None, process_group: dist.ProcessGroup | None = None) -> None:
        self.config = config if config is not None else AdaCompConfig()
        self.process_group = process_group
        self.compressor = AdaCompCompressor(self.config.always_send_bin_max)
        self.step = 0
        self.residues: dict[int, torch.Tensor] = {}
        self._layouts: dict[int, tuple[int, ...]] = {}
        self.totals: dict[str, LayerBytes] = {t: LayerBytes() for t in LAYER_TYPES}
        self.warmup_bytes = 0
        self.payload_bytes = 0
        self.gathered_bytes = 0
        self.history: deque[StepStats] = deque(maxlen=self.config.history_len)
        self.bucket_stats: dict[int, StepStats] = {}
        self.residue_resets = 0
        self._current: StepStats | None = None

    # ---- statistics -------------------------------------------------------

    def compression_rate(self) -> dict[str, float]:
        """Dense fp32 bytes / wire bytes per layer type, plus ``"total"``.

        Only compressed (post warm-up) steps count; layer types never seen
        report ``nan``.
        """
        out = {t: b.compression_rate for t, b in self.totals.items()}
        total = LayerBytes()
        for b in self.totals.values():
            total.add(b)
        out["total"] = total.compression_rate
        return out

    def bytes_sent(self) -> int:
        """Everything this worker contributed: warm-up dense bytes + payloads."""
        return self.warmup_bytes + self.payload_bytes

    def _step_record(self) -> StepStats:
        if self._current is None or self._current.step != self.step:
            self._current = StepStats(step=self.step, warmup=self.step < self.config.warmup_steps)
        return self._current

    def _finish_bucket(self, bucket: dist.GradBucket) -> None:
        if bucket.is_last():
            if self._current is not None:
                self.history.append(self._current)
            self._current = None
            self.step += 1

    # ---- residues ---------------------------------------------------------

    def _residue_for(self, index: int, layout: tuple[int, ...], device: torch.device) -> torch.Tensor:
        res = self.residues.get(index)
        if res is not None and self._layouts.get(index) not in (None, layout):
            self.residue_resets += 1
            warnings.warn(
                f"AdaComp: bucket {index} changed layout (DDP re-bucketed after residues were "
                "created); dropping its residue. Use warmup_steps >= 1 to avoid this.",
                RuntimeWarning,
                stacklevel=3,
            )
            res = None
        numel = sum(layout)
        if res is None or res.numel() != numel:
            res = torch.zeros(numel, dtype=torch.float32, device=device)
        elif res.device != device:
            res = res.to(device)
        self.residues[index] = res
        self._layouts[index] = layout
        return res

    # ---- checkpointing ----------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Residues (cloned to CPU), layouts, step and cumulative counters."""
        return {
            "version": _STATE_VERSION,
            "config": self.config.to_dict(),
            "step": self.step,
            "residues": {int(k): v.detach().cpu().clone() for k, v in self.residues.items()},
            "layouts": {int(k): list(v) for k, v in self._layouts.items()},
            "totals": {t: dataclasses.asdict(b) for t, b in self.totals.items()},
            "warmup_bytes": self.warmup_bytes,
            "payload_bytes": self.payload_bytes,
            "gathered_bytes": self.gathered_bytes,
            "residue_resets": self.residue_resets,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output. The current ``config`` is kept.

        Residues stay on the CPU until the hook first touches their bucket,
        then move to the bucket's device.
        """
        if state.get("version") != _STATE_VERSION:
            raise InputError(f"unsupported AdaCompState version {state.get('version')!r}")
        residues = {int(k): torch.as_tensor(v, dtype=torch.float32).reshape(-1).clone()
                    for k, v in state["residues"].items()}
        layouts = {int(k): tuple(int(x) for x in v) for k, v in state["layouts"].items()}
        for k, res in residues.items():
            if k in layouts and sum(layouts[k]) != res.numel():
                raise InputError(f"residue of bucket {k} has {res.numel()} elements, layout says {sum(layouts[k])}")
        totals = {t: LayerBytes(**dict(state["totals"][t])) for t in LAYER_TYPES}
        self.step = int(state["step"])
        self.residues = residues
        self._layouts = layouts
        self.totals = totals
        self.warmup_bytes = int(state["warmup_bytes"])
        self.payload_bytes = int(state["payload_bytes"])
        self.gathered_bytes = int(state["gathered_bytes"])
        self.residue_resets = int(state["residue_resets"])
        self._current = None

    def __getstate__(self) -> dict[str, Any]:
        # process groups cannot be pickled (DDP may pickle hook state)
        d = dict(self.__dict__)
        d["process_group"] = None
        return d


def _bucket_layout(bucket: dist.GradBucket) -> tuple[list[torch.Tensor], tuple[int, ...]]:
    params = list(bucket.parameters())
    layout = tuple(int(p.numel()) for p in params)
    if sum(layout) != bucket.buffer().numel():
        raise UsageError(
            f"bucket {bucket.index()}: parameters cover {sum(layout)} elements but the buffer has "
            f"{bucket.buffer().numel()}"
        )
    return params, layout


def _local_payload(state: AdaCompState, bucket: dist.GradBucket) -> tuple[bytes, dict[str, LayerBytes]]:
    """Compress this worker's bucket; returns the framed payload and byte counts."""
    buf = bucket.buffer()
    params, layout = _bucket_layout(bucket)
    residue = state._residue_for(bucket.index(), layout, buf.device)
    by_type = {t: LayerBytes() for t in LAYER_TYPES}
    messages: list[bytes] = []
    offset = 0
    for p, n in zip(params, layout, strict=True):
        ltype = layer_type_of(p)
        msg = state.compressor.compress(
            buf[offset : offset + n], residue[offset : offset + n], state.config.bin_len_for(ltype)
        )
        enc = encode_message(msg)
        messages.append(enc)
        by_type[ltype].add(LayerBytes(dense_bytes=4 * n, wire_bytes=len(enc) + 4, numel=n, sent=msg.nnz))
        offset += n
    return frame(messages), by_type


def _aggregate(bucket: dist.GradBucket, payloads: Sequence[bytes]) -> torch.Tensor:
    """Decode all workers' payloads (in rank order), average, write the bucket."""
    buf = bucket.buffer()
    _, layout = _bucket_layout(bucket)
    acc = torch.zeros(buf.numel(), dtype=torch.float32, device=buf.device)
    for payload in payloads:
        frames = unframe(payload, len(layout))
        offset = 0
        for message, n in zip(frames, layout, strict=True):
            msg = decode_message(message, expected_numel=n)
            AdaCompCompressor.accumulate(acc[offset : offset + n], msg)
            offset += n
    acc.div_(len(payloads))
    buf.copy_(acc)
    return buf


def _all_gather_bytes(payload: bytes, device: torch.device, group: dist.ProcessGroup | None) -> tuple[list[bytes], int]:
    """Variable-size all-gather via (lengths, zero-padded bytes); returns payloads and bytes pushed."""
    world = dist.get_world_size(group)
    length = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    dist.all_gather(lengths, length, group=group)
    sizes = [int(t.item()) for t in lengths]
    max_len = max(sizes)
    local = torch.zeros(max_len, dtype=torch.uint8)
    if payload:
        local[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    local = local.to(device)
    gathered = [torch.empty(max_len, dtype=torch.uint8, device=device) for _ in range(world)]
    dist.all_gather(gathered, local, group=group)
    out = [bytes(t[:s].cpu().numpy().tobytes()) for t, s in zip(gathered, sizes, strict=True)]
    return out, max_len + 8


def _completed(value: torch.Tensor) -> torch.futures.Future[torch.Tensor]:
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(value)
    return fut


def adacomp_hook(state: AdaCompState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook running AdaComp on every gradient bucket.

    Register with ``ddp_model.register_comm_hook(state, adacomp_hook)`` or
    :func:`register_adacomp`. Works with gloo (CPU) and NCCL (the byte tensors
    live on the bucket's device). The collectives are blocking, so the returned
    future is already completed.
    """
    group = state.process_group
    buf = bucket.buffer()
    record = state._step_record()
    if state.step < state.config.warmup_steps:
        # plain all-reduce; counted as dense bytes
        params, layout = _bucket_layout(bucket)
        for p, n in zip(params, layout, strict=True):
            record.by_type[layer_type_of(p)].add(LayerBytes(dense_bytes=4 * n, wire_bytes=4 * n, numel=n, sent=n))
        record.payload_bytes += 4 * buf.numel()
        record.gathered_bytes += 4 * buf.numel()
        state.warmup_bytes += 4 * buf.numel()
        dist.all_reduce(buf, group=group)
        buf.div_(dist.get_world_size(group))
        state.bucket_stats[bucket.index()] = StepStats(step=state.step, warmup=True)
        state._finish_bucket(bucket)
        return _completed(buf)

    payload, by_type = _local_payload(state, bucket)
    payloads, gathered = _all_gather_bytes(payload, buf.device, group)
    result = _aggregate(bucket, payloads)

    bucket_record = StepStats(step=state.step, warmup=False, by_type=by_type)
    bucket_record.payload_bytes = len(payload)
    bucket_record.gathered_bytes = gathered
    state.bucket_stats[bucket.index()] = bucket_record
    for t, b in by_type.items():
        record.by_type[t].add(b)
        state.totals[t].add(b)
    record.payload_bytes += len(payload)
    record.gathered_bytes += gathered
    state.payload_bytes += len(payload)
    state.gathered_bytes += gathered
    state._finish_bucket(bucket)
    return _completed(result)


def register_adacomp(
    ddp_model: torch.nn.parallel.DistributedDataParallel,
    config: AdaCompConfig | None = None,
    process_group: dist.ProcessGroup | None = None,
) -> AdaCompState:
    """Create an :class:`AdaCompState`, register :func:`adacomp_hook`, return the state.

    ``process_group`` defaults to the DDP model's group.
    """
    group = process_group if process_group is not None else getattr(ddp_model, "process_group", None)
    state = AdaCompState(config, group)
    ddp_model.register_comm_hook(state, adacomp_hook)
    return state

