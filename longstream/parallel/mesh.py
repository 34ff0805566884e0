"""Process groups for data x sequence parallelism, from the torchrun environment.

Layout. The `world_size` ranks form a 2D `DeviceMesh` of shape (dp, sp) with dim names ("dp", "sp"), filled
row-major: global rank = dp_rank * sp + sp_rank. So the ranks of one SP group are consecutive (one host, the
fast links); ranks with the same sp_rank across dp form a DP group (gradients are averaged there).

Without torchrun (no WORLD_SIZE in the environment) `ParallelContext.from_env()` is a single process: sp = dp =
1, no process group, every group is None and the exchanges of `longstream.parallel.ulysses` are identities.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..errors import LongstreamError


class ParallelError(LongstreamError):
    """A parallel layout that cannot work (sizes, environment)."""


_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class ParallelContext:
    """Where this process sits in the (dp, sp) mesh and the groups it talks through."""

    rank: int
    world_size: int
    local_rank: int
    dp_size: int
    sp_size: int
    dp_rank: int
    sp_rank: int
    device: torch.device
    mesh: DeviceMesh | None = None
    owns_process_group: bool = False

    # -- construction ---------------------------------------------------------------------------------------------
    @classmethod
    def single(cls, device: torch.device | str | None = None) -> "ParallelContext":
        """One process, no process group (sp = dp = 1)."""
        dev = torch.device(device) if device is not None else _default_device(0)
        return cls(rank=0, world_size=1, local_rank=0, dp_size=1, sp_size=1, dp_rank=0, sp_rank=0, device=dev)

    @classmethod
    def from_env(
        cls,
        sp_size: int | None = None,
        *,
        device: torch.device | str | None = None,
        backend: str | None = None,
        timeout_s: float = 600.0,
        env: Mapping[str, str] | None = None,
    ) -> "ParallelContext":
        """Build the context from torchrun's RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT.

        `sp_size` defaults to the whole world (dp = 1). The backend is nccl for CUDA devices, gloo otherwise; the
        CUDA device is `cuda:LOCAL_RANK`. An already initialized default process group is reused (and then not
        destroyed by `close`)."""
        env = os.environ if env is None else env
        if "WORLD_SIZE" not in env and not dist.is_initialized():
            if sp_size not in (None, 1):
                raise ParallelError(
                    f"sp_size={sp_size} needs several processes: launch with torchrun --nproc-per-node {sp_size} "
                    "(WORLD_SIZE is not set)"
                )
            return cls.single(device)
        if dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
            local_rank = int(env.get("LOCAL_RANK", rank))
        else:
            missing = [k for k in _ENV if k not in env]
            if missing:
                raise ParallelError(f"incomplete torchrun environment: {', '.join(missing)} not set")
            rank, world, local_rank = _int_env(env, "RANK"), _int_env(env, "WORLD_SIZE"), _int_env(env, "LOCAL_RANK")
            if world <= 0 or not 0 <= rank < world:
                raise ParallelError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world}")
        sp = world if sp_size is None else int(sp_size)
        if sp <= 0:
            raise ParallelError(f"sp_size must be positive, got {sp}")
        if world % sp:
            raise ParallelError(f"world size {world} is not divisible by sp_size {sp}")
        dev = torch.device(device) if device is not None else _default_device(local_rank)
        if dev.type == "cuda":
            if not torch.cuda.is_available() or local_rank >= torch.cuda.device_count():
                raise ParallelError(f"LOCAL_RANK {local_rank} has no CUDA device (found {torch.cuda.device_count()})")
            if dev.index is None:
                dev = torch.device("cuda", local_rank)
            torch.cuda.set_device(dev)
        owns = False
        if not dist.is_initialized():
            be = backend or ("nccl" if dev.type == "cuda" else "gloo")
            dist.init_process_group(
                be, init_method="env://", rank=rank, world_size=world,
                timeout=datetime.timedelta(seconds=timeout_s),
                device_id=dev if dev.type == "cuda" else None,
            )
            owns = True
        mesh = init_device_mesh(dev.type, (world // sp, sp), mesh_dim_names=("dp", "sp"))
        return cls(
            rank=rank, world_size=world, local_rank=local_rank, dp_size=world // sp, sp_size=sp,
            dp_rank=mesh.get_local_rank("dp"), sp_rank=mesh.get_local_rank("sp"), device=dev, mesh=mesh,
            owns_process_group=owns,
        )

    # -- groups ---------------------------------------------------------------------------------------------------
    @property
    def distributed(self) -> bool:
        return self.mesh is not None

    @property
    def sp_group(self) -> "dist.ProcessGroup | None":
        """The SP group (None in a single process)."""
        return None if self.mesh is None else self.mesh.get_group("sp")

    @property
    def dp_group(self) -> "dist.ProcessGroup | None":
        """The DP group (None in a single process)."""
        return None if self.mesh is None else self.mesh.get_group("dp")

    def sp_ranks(self) -> list[int]:
        """Global ranks of this process's SP group, in sp_rank order."""
        start = self.dp_rank * self.sp_size
        return list(range(start, start + self.sp_size))

    def close(self) -> None:
        """Destroy the process group if this context created it."""
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
        self.mesh = None
        self.owns_process_group = False


def _int_env(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise ParallelError(f"{key}={env[key]!r} is not an integer") from None


def _default_device(local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
