"""Data x sequence parallel training: `longstream train CONFIG.yaml` under `torchrun --nproc-per-node N`.

The N ranks form the (dp, sp) mesh of `ParallelContext` with sp = `TrainConfig.sp` and dp = N / sp; the ranks of an
SP group are consecutive. A distributed step computes what the single-process step computes:

- Batch: `batch_size` is the global batch. Step k's examples are the single-process ones; dp rank d trains examples
  [d*b, (d+1)*b) of them (b = batch_size / dp). Every rank draws the noise levels and noise of the whole global
  batch from the step's generator, in the order of `objectives.py`, and keeps its part.
- Sequence: `teacher_forcing` uses Balanced SP (`BalancedLayout`): sp rank r holds the clean and the noisy frames
  of time slice r; the model's self-attention goes through `UlyssesAttention` with the teacher-forcing mask in
  exchange order. `flow_matching` splits the frames contiguously (`even_splits`, uneven counts allowed) and
  attends bidirectionally through Ulysses. Heads need not divide sp (Ulysses splits them unevenly). A rank's share
  reads only the latents of its frames (`frame_range`): with `videos:` (video_source.py) it encodes just those.
- Loss: a rank's squared error over its loss-bearing tokens divided by the element count of its dp rank's clips.
  Summed over sp and averaged over dp this is the single-process loss, and gradients are reduced the same way:
  an all-reduce sum over the SP group, and FSDP2's reduce-scatter mean over dp.
- FSDP2 (`fully_shard` over the mesh's dp dimension, when dp > 1; the same calls on NCCL and on gloo/CPU, where
  torch 2.13 runs it and the tests check it): each block's cross-attention K/V projections are units of their
  own (`prepare_text` runs them for every block before the blocks run), then each block, then the root.
  Parameters, gradients and optimizer state are sharded over dp and replicated over sp. The EMA copy is
  sharded the same way (root unit only; it never runs forward).
- Checkpoints: full tensors are gathered (a collective) and rank 0 writes them in the single-process format, so a
  run resumes with any number of processes; loading gives every rank its shard of the full tensors.
"""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from ..config import ConfigError, TransformerConfig
from ..model.attention import FrameMaskAttention
from ..model.checkpoints import FORMAT
from ..model.transformer import CausalWanTransformer, config_dict
from ..parallel import BalancedLayout, ParallelContext, ParallelError, UlyssesAttention, even_splits, make_layout
from ..safetensors_io import save_atomic
from .objectives import sample_sigmas

PARALLEL_OBJECTIVES = ("flow_matching", "teacher_forcing")


def launched_world_size() -> int:
    """Processes of this run: the initialized process group's, else torchrun's WORLD_SIZE, else 1."""
    if dist.is_initialized():
        return dist.get_world_size()
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(value)
    except ValueError:
        raise ParallelError(f"WORLD_SIZE={value!r} is not an integer") from None


def check_layout(objective: str, sp: int, world: int, batch_size: int, clip_frames: int, chunk_frames: int,
                 model: TransformerConfig) -> None:
    """Refuse a (dp, sp) layout that cannot run, before any process group, data or model exists."""
    if objective not in PARALLEL_OBJECTIVES:
        raise ConfigError(f"objective {objective} trains in one process; launched with {world} processes")
    if world % sp:
        raise ConfigError(f"sp {sp} does not divide the {world} processes (torchrun --nproc-per-node)")
    dp = world // sp
    if batch_size % dp:
        raise ConfigError(f"batch_size {batch_size} (the global batch) is not divisible by dp = {world} / sp {sp}"
                          f" = {dp}")
    if sp == 1:
        return
    if model.patch_size[0] != 1:
        raise ConfigError(f"sp > 1 needs a temporal patch of 1 frame, the preset has {model.patch_size[0]}")
    if sp > model.num_attention_heads:
        raise ConfigError(f"sp {sp} exceeds the model's {model.num_attention_heads} attention heads")
    if objective == "teacher_forcing":
        BalancedLayout(clip_frames, chunk_frames, sp)  # one-line ParallelError for frames not divisible by sp
    elif clip_frames < sp:
        raise ConfigError(f"clip_frames {clip_frames} is below sp {sp}: every SP rank needs a latent frame")


def write_transformer(state: dict[str, torch.Tensor], config: TransformerConfig, path) -> None:
    """A gathered transformer state dict in `save_transformer`'s format."""
    save_atomic(state, path, {"longstream_format": FORMAT, "config": json.dumps(config_dict(config))})


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class ParallelTraining:
    """This rank's share of a training step on the (dp, sp) mesh of `ctx` (see the module docstring)."""

    def __init__(self, ctx: ParallelContext, objective: str, chunk_frames: int, shift: float,
                 layout: str = "balanced") -> None:
        """`layout`: the teacher-forcing SP layout, "balanced" (what the trainer uses) or "naive" (the contiguous
        split of `NaiveLayout`, for comparison in bench/sp_training.py)."""
        self.ctx = ctx
        self.objective = objective
        self.chunk_frames = chunk_frames
        self.shift = shift
        self.layout = layout

    @property
    def is_main(self) -> bool:
        return self.ctx.rank == 0

    # -- model --------------------------------------------------------------------------------------------------
    def shard(self, model: CausalWanTransformer, ema: CausalWanTransformer | None) -> None:
        """FSDP2 over the dp dimension (nothing to do when dp = 1)."""
        if self.ctx.dp_size == 1:
            return
        mesh = self.ctx.mesh["dp"]
        for block in model.blocks:
            for part in (block.attn2.to_k, block.attn2.to_v, block.attn2.norm_k):
                fully_shard(part, mesh=mesh)
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        if ema is not None:
            fully_shard(ema, mesh=mesh)

    def sync_gradients(self, model: torch.nn.Module, last_micro_batch: bool) -> None:
        """Reduce-scatter gradients over dp only after the last micro-batch of a step."""
        if isinstance(model, FSDPModule):
            model.set_requires_gradient_sync(last_micro_batch)

    def reduce_gradients(self, model: torch.nn.Module) -> None:
        """Sum the gradients (or this rank's shards of them) over the SP group."""
        if self.ctx.sp_size == 1:
            return
        works = [dist.all_reduce(_local(p.grad), group=self.ctx.sp_group, async_op=True)
                 for p in model.parameters() if p.grad is not None]
        for work in works:
            work.wait()

    # -- loss ---------------------------------------------------------------------------------------------------
    def batch_part(self, indices: list[int]) -> list[int]:
        """This dp rank's examples of a global batch."""
        b = len(indices) // self.ctx.dp_size
        return indices[self.ctx.dp_rank * b: (self.ctx.dp_rank + 1) * b]

    def frame_range(self, num_frames: int) -> tuple[int, int]:
        """The clip frames [start, end) whose latents this rank's share of the step reads: its time slice
        (Balanced SP) or its contiguous split (flow matching); all frames for the naive layout."""
        r, sp = self.ctx.sp_rank, self.ctx.sp_size
        if self.objective == "flow_matching":
            frames = even_splits(num_frames, sp)
            return sum(frames[:r]), sum(frames[: r + 1])
        if self.layout != "balanced":
            return 0, num_frames
        width = make_layout("balanced", num_frames, self.chunk_frames, sp).slice_frames
        return r * width, (r + 1) * width

    def loss(self, model: CausalWanTransformer, x0: torch.Tensor, text: torch.Tensor, batch: int,
             generator: torch.Generator, num_frames: int | None = None) -> torch.Tensor:
        """This rank's loss term for its clips `x0` of a global batch of `batch` clips: [b, C, F, h, w], or, with
        `num_frames` = F, only the frames `frame_range(F)` of them (e.g. a rank that encoded only its slice)."""
        f = num_frames or x0.shape[2]
        lo, hi = self.frame_range(f)
        if x0.shape[2] == f:
            x0 = x0[:, :, lo:hi]
        elif x0.shape[2] != hi - lo:
            raise ValueError(f"x0 holds {x0.shape[2]} frames: expected {f} or this rank's {hi - lo}")
        b = x0.shape[0]
        part = slice(self.ctx.dp_rank * b, (self.ctx.dp_rank + 1) * b)
        chunks = 1 if self.objective == "flow_matching" else f // self.chunk_frames
        s = sample_sigmas((batch, chunks), self.shift, generator, x0.device).to(x0.dtype)[part]
        noise = torch.randn((batch, *x0.shape[1:2], f, *x0.shape[3:]), generator=generator,
                            device=generator.device)[part, :, lo:hi].to(x0)
        if self.objective == "flow_matching":
            return self._flow_matching(model, x0, text, s[:, 0], noise, f, lo, hi)
        return self._teacher_forcing(model, x0, text, s, noise, f, lo, hi)

    def _tokens_per_frame(self, model: CausalWanTransformer, x0: torch.Tensor) -> int:
        _, ph, pw = model.config.patch_size
        return (x0.shape[3] // ph) * (x0.shape[4] // pw)

    # x0 and noise below hold this rank's frames [lo, hi) = frame_range(f) of clips of f frames
    def _flow_matching(self, model, x0, text, s, noise, f: int, lo: int, hi: int) -> torch.Tensor:
        sb = s.view(-1, 1, 1, 1, 1)
        x_t = (1 - sb) * x0 + sb * noise
        tpf = self._tokens_per_frame(model, x0)
        attend = UlyssesAttention(self.ctx.sp_group, [n * tpf for n in even_splits(f, self.ctx.sp_size)])
        positions = torch.arange(lo, hi, device=x0.device)
        pred = model(x_t, 1000.0 * s, text, causal=False, frame_positions=positions, self_attention=attend)
        return (pred.float() - (noise - x0).float()).pow(2).sum() / (x0[:, :, :1].numel() * f)

    def _teacher_forcing(self, model, x0, text, s_chunk, noise, f: int, lo: int, hi: int) -> torch.Tensor:
        b, r = x0.shape[0], self.ctx.sp_rank
        s = s_chunk.repeat_interleave(self.chunk_frames, dim=1)[:, lo:hi]  # [b, frames of this rank]
        sb = s.view(b, 1, hi - lo, 1, 1)
        noisy = (1 - sb) * x0 + sb * noise
        layout = make_layout(self.layout, f, self.chunk_frames, self.ctx.sp_size)
        frames = layout.local_frames(r).to(x0.device)  # indices into [clean 0..f, noisy f..2f)
        local = frames % f - lo + (frames >= f) * (hi - lo)  # ... into [clean lo..hi, noisy lo..hi)
        seq = torch.cat([x0, noisy], dim=2).index_select(2, local)
        t = torch.cat([torch.zeros_like(s), 1000.0 * s], dim=1).index_select(1, local)
        positions = frames % f
        tpf = self._tokens_per_frame(model, x0)
        inner = FrameMaskAttention.for_mask(layout.frame_mask(), tpf)  # exchange order, by frame groups
        attend = UlyssesAttention(self.ctx.sp_group, layout.seq_splits(tpf), inner=inner)
        pred = model(seq, t, text, causal=False, frame_positions=positions, self_attention=attend)
        loss_frames = frames >= f
        target = (noise - x0).index_select(2, frames[loss_frames] - f - lo)
        return (pred[:, :, loss_frames].float() - target.float()).pow(2).sum() / (x0[:, :, :1].numel() * f)

    # -- agreement between ranks --------------------------------------------------------------------------------
    def reduce_loss(self, loss: torch.Tensor) -> float:
        """The single-process loss value from the ranks' terms (summed over sp, averaged over dp)."""
        total = loss.detach().float().reshape(1).clone()
        dist.all_reduce(total)
        return total.item() / self.ctx.dp_size

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on one (e.g. a time limit reached)."""
        value = torch.tensor([float(flag)], device=self.ctx.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def from_main(self, value: object) -> object:
        """Rank 0's `value` on every rank."""
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        dist.barrier()

    # -- checkpoints --------------------------------------------------------------------------------------------
    def full_state(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Unsharded CPU copy of `module`'s state dict on rank 0 (empty elsewhere); every rank must call it."""
        out = {}
        for name, value in module.state_dict().items():
            full = value.full_tensor() if isinstance(value, DTensor) else value
            if self.is_main:
                out[name] = full.detach().cpu()
        return out

    def load_full_state(self, module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Load a full (single-process) state dict: each rank keeps its shards."""
        local = {}
        for name, value in module.state_dict().items():
            full = state[name].to(device=value.device, dtype=value.dtype)
            local[name] = (distribute_tensor(full, value.device_mesh, value.placements, src_data_rank=None)
                           if isinstance(value, DTensor) else full)
        module.load_state_dict(local, strict=True)

    def full_optimizer_state(self, opt: torch.optim.Optimizer) -> dict:
        """`opt.state_dict()` with full tensors, as a single process writes it (rank 0; empty elsewhere)."""
        packed = opt.state_dict()
        state = {}
        for index in sorted(packed["state"]):  # every rank takes part in the gathers; only rank 0 keeps a copy
            entry = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in packed["state"][index].items()}
            if self.is_main:
                state[index] = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in entry.items()}
        return {"state": state, "param_groups": packed["param_groups"]} if self.is_main else {}

    def load_optimizer_state(self, opt: torch.optim.Optimizer, packed: dict) -> None:
        """Load a single-process optimizer state: per-parameter tensors become this rank's shards."""
        params = [p for group in opt.param_groups for p in group["params"]]
        for index, entry in packed["state"].items():
            p = params[index]
            if isinstance(p, DTensor):
                for key, value in entry.items():
                    if isinstance(value, torch.Tensor) and value.shape == p.shape:
                        entry[key] = distribute_tensor(value.to(p.device), p.device_mesh, p.placements,
                                                       src_data_rank=None)
        opt.load_state_dict(packed)
