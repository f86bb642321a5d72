"""The policy's weights from the trainer's rank 0 to every generator engine over a collective:
NCCL from GPU memory to GPU memory on GPUs, gloo on a CPU (where it is tested). No Ray here.

The object-store path (`weights.weights_blob`) copies a policy to CPU bytes, into the object
store, to each engine's node and through vLLM's RPC before it reaches a GPU again: fine for a
small model, minutes of copies per refresh at 7B. Here rank 0 keeps one copy of the exported
tensors in its memory when a round ends (`WeightSender`) and publishes a `WeightOffer`: the
address of a TCPStore of its own and the tensors' names, dtypes and shapes. At the refresh,
every engine worker joins a process group made for this one transfer (rank 0 + all engine
workers; separate from Ray Train's group and from vLLM's), announces the group's size, and
receives each tensor by broadcast (`receive_weights`), which the engine loads in place. A
group per refresh costs a communicator set-up each time (about a second with NCCL) and keeps
nothing alive across engine replacements or trainer restarts.

GPU status: the NCCL branch (`ProcessGroupNCCL`, CUDA tensors) is written and has never run:
no GPU has been lent to this project yet. The gloo branch runs the same code in the tests.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["BroadcastSeat", "WeightOffer", "WeightSender", "receive_weights", "seats"]

WORLD_KEY = "world"
"""The store key receivers set to the group's size; the sender waits for it."""
CONNECT_TIMEOUT_S = 30.0
BACKENDS = ("nccl", "gloo")


@dataclass(frozen=True)
class WeightOffer:
    """Where and what: small and picklable, it travels through Ray to the engines."""
    host: str
    port: int
    backend: str  # "nccl" | "gloo"
    specs: tuple[tuple[str, str, tuple[int, ...]], ...]  # (name, dtype, shape), in send order
    timeout_s: float

    @property
    def nbytes(self) -> int:
        return sum(torch.Size(shape).numel() * getattr(torch, dtype).itemsize
                   for _, dtype, shape in self.specs)


@dataclass(frozen=True)
class BroadcastSeat:
    """One engine's place in a refresh's group: its first worker's rank (tensor-parallel
    workers take the ranks after it) and the group's size."""
    offer: WeightOffer
    first_rank: int
    world: int


def seats(offer: WeightOffer, engines: int, workers_per_engine: int) -> list[BroadcastSeat]:
    """Rank 0 is the trainer; engine i's workers are ranks 1 + i * workers_per_engine ..."""
    world = 1 + engines * workers_per_engine
    return [BroadcastSeat(offer, 1 + i * workers_per_engine, world) for i in range(engines)]


def _group(backend: str, store: dist.Store, rank: int, world: int,
           timeout_s: float) -> dist.ProcessGroup:
    """A process group of its own (not torch's default group, which Ray Train or vLLM owns)."""
    timeout = timedelta(seconds=timeout_s)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world, timeout)
    if backend == "nccl":  # untested: see the module docstring
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world, options)
    raise ValueError(f"weight broadcast backend {backend!r} is not one of {', '.join(BACKENDS)}")


def _broadcast(group: dist.ProcessGroup, tensor: torch.Tensor) -> None:
    options = dist.BroadcastOptions()
    options.rootRank = 0
    group.broadcast([tensor], options).wait()


class WeightSender:
    """Rank 0's side of one refresh: holds `tensors` (in CPU memory, not shared with training)
    and serves them, in a thread, to the first group that forms on its store, each copied to
    `device` just before its broadcast (NCCL sends from GPU memory: one tensor at a time
    there, not a second copy of the policy beside training). `close()` ends the wait (a newer
    round's sender replaces this one) and frees them."""

    def __init__(self, tensors: dict[str, torch.Tensor], backend: str, host: str,
                 timeout_s: float = 600.0, device: torch.device | str = "cpu") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"weight broadcast backend {backend!r} is not one of "
                             f"{', '.join(BACKENDS)}")
        self.tensors = tensors
        self.store: dist.TCPStore | None = dist.TCPStore(
            host, 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=timeout_s))
        self.offer = WeightOffer(host=host, port=self.store.port, backend=backend,
                                 specs=tuple((n, str(t.dtype).removeprefix("torch."),
                                              tuple(t.shape)) for n, t in tensors.items()),
                                 timeout_s=timeout_s)
        self.device = torch.device(device)
        self.error: BaseException | None = None
        self.sent = threading.Event()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="weight-sender", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        store = self.store
        assert store is not None
        try:
            while not store.check([WORLD_KEY]):
                if self._closed.wait(0.2):
                    return
            world = int(store.get(WORLD_KEY))
            group = _group(self.offer.backend, store, 0, world, self.offer.timeout_s)
            for tensor in self.tensors.values():
                _broadcast(group, tensor.to(self.device))
            self.sent.set()
        except BaseException as exc:  # kept for the log: the engines fall back to the folder
            self.error = exc
        finally:
            self.tensors = {}

    def close(self, timeout_s: float = 5.0) -> None:
        """Stops waiting; the store's port closes once the thread is done with it."""
        self._closed.set()
        self._thread.join(timeout_s)
        self.tensors = {}
        if not self._thread.is_alive():
            self.store = None


def receive_weights(offer: WeightOffer, rank: int, world: int,
                    device: torch.device | str) -> Iterator[tuple[str, torch.Tensor]]:
    """An engine worker's side (rank >= 1 of `world`): joins the offer's group and yields each
    tensor as it arrives on `device`, for a loader that takes (name, tensor) pairs."""
    if not 1 <= rank < world:
        raise ValueError(f"an engine's rank must be in 1..{world - 1}, not {rank}")
    # A short connect timeout: a sender that is gone (its trainer restarted) fails the refresh
    # fast, and the engines load the checkpoint folder instead.
    store = dist.TCPStore(offer.host, offer.port, is_master=False,
                          timeout=timedelta(seconds=min(CONNECT_TIMEOUT_S, offer.timeout_s)))
    store.set(WORLD_KEY, str(world))  # every receiver says the same; the sender waits for it
    group = _group(offer.backend, store, rank, world, offer.timeout_s)
    for name, dtype, shape in offer.specs:
        tensor = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
        _broadcast(group, tensor)
        yield name, tensor
