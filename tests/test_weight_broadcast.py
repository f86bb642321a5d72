"""The trainer-to-engines weight broadcast (dqo_ray/models/weight_broadcast.py) over gloo: the
code the NCCL path runs on GPUs, with the sender and the engines' receivers as threads."""

import threading
import time

import pytest
import torch

from dqo_ray.models import weight_broadcast
from dqo_ray.models.weight_broadcast import WeightSender, receive_weights, seats
from dqo_ray.models.weights import export_tensors

HOST = "127.0.0.1"


def receive_all(offer, ranks, world):
    """Each rank in its own thread, as each engine worker is its own process."""
    got: dict[int, dict[str, torch.Tensor]] = {}
    errors: list[BaseException] = []

    def run(rank):
        try:
            got[rank] = dict(receive_weights(offer, rank, world, "cpu"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(r,)) for r in ranks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return got, errors


def test_every_engine_worker_receives_every_tensor_exactly():
    torch.manual_seed(0)
    embed = torch.randn(7, 4)
    trained = {"embed.weight": embed, "lm_head.weight": embed,  # tied: sent once
               "layer.weight": torch.randn(4, 4), "count": torch.arange(3)}
    tensors = export_tensors(trained, torch.bfloat16)
    assert list(tensors) == ["embed.weight", "layer.weight", "count"]
    assert tensors["count"].dtype == torch.int64 and tensors["layer.weight"].dtype == torch.bfloat16
    sender = WeightSender(tensors, "gloo", HOST, timeout_s=30)
    trained["layer.weight"].add_(1.0)  # the next round's steps do not change what is sent
    assert sender.offer.nbytes == (7 * 4 + 4 * 4) * 2 + 3 * 8
    two_engines_tp2 = seats(sender.offer, engines=2, workers_per_engine=2)
    assert [(s.first_rank, s.world) for s in two_engines_tp2] == [(1, 5), (3, 5)]
    got, errors = receive_all(sender.offer, range(1, 5), 5)
    assert not errors and sender.sent.wait(10) and sender.error is None
    for rank in range(1, 5):
        assert list(got[rank]) == list(tensors)
        for name, tensor in tensors.items():
            assert got[rank][name].dtype == tensor.dtype
            assert torch.equal(got[rank][name], tensor)
    assert not torch.equal(got[1]["layer.weight"], trained["layer.weight"].bfloat16())
    sender.close()
    assert sender.tensors == {} and sender.store is None


def test_a_closed_sender_stops_waiting_and_its_offer_fails_fast(monkeypatch):
    """A newer round's offer replaces an unused one; engines that come for the old one find
    nobody (a restarted trainer) and fail within the connect timeout, not the transfer's."""
    sender = WeightSender({"w": torch.ones(2)}, "gloo", HOST, timeout_s=300)
    start = time.perf_counter()
    sender.close()
    assert time.perf_counter() - start < 2 and not sender.sent.is_set()
    monkeypatch.setattr(weight_broadcast, "CONNECT_TIMEOUT_S", 1.0)
    start = time.perf_counter()
    got, errors = receive_all(sender.offer, [1], 2)
    assert errors and not got and time.perf_counter() - start < 30


def test_bad_backend_and_rank_are_named():
    unused = WeightSender({"w": torch.ones(1)}, "gloo", HOST)
    with pytest.raises(ValueError, match=r"rank must be in 1\.\.2, not 0"):
        next(receive_weights(unused.offer, 0, 3, "cpu"))
    unused.close()
    with pytest.raises(ValueError, match="backend 'mpi' is not one of nccl, gloo"):
        WeightSender({"w": torch.ones(1)}, "mpi", HOST)


def test_auto_broadcasts_from_gpus_and_uses_the_object_store_on_a_cpu():
    from dqo_ray.config import load_config
    from dqo_ray.train.ray_trainer import broadcast_backend

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    want = {"auto": (None, "nccl"), "broadcast": ("gloo", "nccl"),
            "object_store": (None, None)}
    for transfer, backends in want.items():
        cfg = load_config(None, [f"generation.weight_transfer={transfer}"])
        assert (broadcast_backend(cfg, cpu), broadcast_backend(cfg, gpu)) == backends
