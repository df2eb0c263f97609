"""How a model is spread over processes: TP, EP inside TP, nodes. Checked on creation.

SGLang's meanings (and ours):
- ``--tp-size N``: one replica's ranks; attention heads, MLP intermediates and the vocab
  are split N ways, and N processes (one per GPU) run every layer.
- ``--ep-size M`` (or ``--enable-ep-moe``, which means M = N): the N TP ranks are
  partitioned into M expert-parallel groups; each group owns E/M experts of every MoE
  layer, and each expert is TP-sharded over the N/M ranks of its group ("moe tp size").
  So M must divide N. EP adds no processes: it re-partitions the TP group for the MoE.
- ``--dp-size D``: D replicas of the TP group behind one server (the front: mixq.server.dp;
  each replica's process: mixq.distributed.replica).
- ``--nnodes K --node-rank i --dist-init-addr HOST:PORT``: the N ranks of a replica are
  spread over K machines, N/K each; rank 0 (node 0) hosts the rendezvous at HOST:PORT.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

import torch

from mixq.errors import ConfigError

MOE_DISPATCH = ("all-reduce", "all-to-all")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (for a single-node rendezvous)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class ParallelConfig:
    tp_size: int = 1
    ep_size: int = 1
    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: str | None = None  # HOST:PORT of rank 0's rendezvous; None: a free local port
    # How MoE tokens reach their experts' ranks: "all-reduce" (every rank has every token:
    # compute the local experts, sum over the group) or "all-to-all" (each rank routes a
    # slice of the tokens, sends each token to its experts' owners, gets the results back).
    moe_dispatch: str = "all-reduce"
    base_gpu_id: int = 0  # first GPU of this replica on its node (DP replicas sit side by side)
    timeout_s: float = 600.0  # a collective waiting longer than this fails (a rank died)

    def __post_init__(self):
        for name in ("tp_size", "ep_size", "nnodes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.tp_size % self.ep_size:
            raise ConfigError(
                f"--ep-size {self.ep_size} must divide --tp-size {self.tp_size}: as in SGLang, expert "
                "parallelism partitions the TP ranks (each expert is sharded over tp/ep ranks)"
            )
        if not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(f"--node-rank {self.node_rank} must be in [0, --nnodes {self.nnodes})")
        if self.tp_size % self.nnodes:
            raise ConfigError(f"--tp-size {self.tp_size} must divide evenly over --nnodes {self.nnodes}")
        if self.nnodes > 1 and not self.dist_init_addr:
            raise ConfigError("--nnodes > 1 needs --dist-init-addr HOST:PORT (rank 0's address)")
        if self.dist_init_addr is not None:
            host, _, port = self.dist_init_addr.rpartition(":")
            if not host or not port.isdigit():
                raise ConfigError(f"--dist-init-addr must be HOST:PORT, got {self.dist_init_addr!r}")
        if self.moe_dispatch not in MOE_DISPATCH:
            raise ConfigError(f"moe dispatch must be one of {', '.join(MOE_DISPATCH)}, got {self.moe_dispatch!r}")
        if self.moe_dispatch == "all-to-all" and self.ep_size != self.tp_size:
            raise ConfigError("all-to-all MoE dispatch needs --ep-size equal to --tp-size (whole experts per rank)")

    @property
    def world_size(self) -> int:
        return self.tp_size

    @property
    def distributed(self) -> bool:
        return self.tp_size > 1

    @property
    def moe_tp_size(self) -> int:
        return self.tp_size // self.ep_size

    @property
    def ranks_per_node(self) -> int:
        return self.tp_size // self.nnodes

    def node_ranks(self, node: int | None = None) -> range:
        """TP ranks hosted by a node (this one by default)."""
        node = self.node_rank if node is None else node
        return range(node * self.ranks_per_node, (node + 1) * self.ranks_per_node)

    def device_for(self, rank: int, device_type: str) -> torch.device:
        """The device a rank computes on: its own GPU on its node, or the CPU."""
        if device_type == "cuda":
            return torch.device("cuda", self.base_gpu_id + rank % self.ranks_per_node)
        return torch.device(device_type)

    def init_method(self) -> str:
        if self.dist_init_addr is None:
            raise ConfigError("no rendezvous address: set dist_init_addr (the driver picks a free port)")
        return f"tcp://{self.dist_init_addr}"
