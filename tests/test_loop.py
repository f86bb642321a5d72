"""The training loop without Ray: exact resume, including from a checkpoint that closes an
epoch (the stream of that epoch is then empty and the loop must move on, not fail), and
rounds trained one after another by the same models as after a restart."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dqo_ray.config import load_config
from dqo_ray.data.batch import pad_trajectories
from dqo_ray.train.loop import TrainState, WorkerIO, build_models, resume, run_training, train_round
from dqo_ray.train.train_engine import init_single_process_group

ROWS, MICRO, ACCUM = 64, 8, 2  # 4 global steps per epoch


@pytest.fixture(scope="module")
def process_group():
    # One group for the module: DeepSpeed keeps a handle on the first group it sees, so a
    # re-created group breaks the next engine. Destroyed after: later tests start vLLM.
    init_single_process_group()
    yield
    dist.destroy_process_group()


def batches_for(epoch_rows):
    def stream(epoch, skip):
        gen = torch.Generator().manual_seed(epoch)  # each epoch its own, fixed order
        order = torch.randperm(len(epoch_rows), generator=gen).tolist()
        rows = [epoch_rows[i] for i in order]
        for s in range(skip, len(rows) // (MICRO * ACCUM)):
            group = []
            for m in range(ACCUM):
                start = (s * ACCUM + m) * MICRO
                batch = pad_trajectories(rows[start:start + MICRO], pad_id=0)
                batch["positions"] = torch.arange(start, start + MICRO)
                batch["order_key"] = batch["positions"]
                group.append(batch)
            yield group
    return stream


def toy_rows():
    gen = torch.Generator().manual_seed(0)
    return [dict(traj_id=str(i), prompt_ids=[5, 6, 7],
                 response_ids=torch.randint(4, 30, (5,), generator=gen).tolist(),
                 behaviour_logprobs=[-2.0] * 5, ref_logprobs=[-2.0] * 5,
                 reward=float(i % 2), finish_reason="stop") for i in range(ROWS)]


class Crash(Exception):
    pass


def run(checkpoint, engine, max_steps, scratch, resume=None, crash_after=None, overrides=()):
    cfg = load_config(None, [f"trainer.engine={engine}", "trainer.zero_stage=1",
                             f"trainer.micro_batch_size={MICRO}",
                             f"trainer.grad_accum_steps={ACCUM}", f"trainer.max_steps={max_steps}",
                             "trainer.log_every=1", "trainer.checkpoint_every=4",
                             "trainer.policy_lr=1e-3", "trainer.value_lr=1e-3",
                             "trainer.lr_schedule=cosine", "trainer.warmup_steps=1", *overrides])
    reports = []

    def report(metrics, folder):
        reports.append((metrics, folder))
        if metrics["step"] == crash_after:  # the process dies right after this checkpoint
            raise Crash

    try:
        state = run_training(cfg, str(checkpoint), WorkerIO(
            0, 1, batches_for(toy_rows()), report, resume_from=resume, scratch=scratch))
    except Crash:
        state = None
    return state, reports


@pytest.mark.parametrize("engine", ["deepspeed", "torch"])
def test_resume_from_an_epoch_closing_checkpoint_is_exact(tiny_checkpoint, tmp_path, engine,
                                                          process_group):
    torch.manual_seed(0)
    _, straight = run(tiny_checkpoint, engine, 6, tmp_path / "a")
    _, first = run(tiny_checkpoint, engine, 6, tmp_path / "b", crash_after=4)
    folder = first[-1][1]
    assert first[-1][0]["step"] == 4 and folder is not None
    saved = json.loads((folder / "trainer_state.json").read_text())
    assert (saved["epoch"], saved["step_in_epoch"]) == (0, 4)  # the epoch had just closed
    resume = tmp_path / "resume"
    shutil.copytree(folder, resume)
    state, resumed = run(tiny_checkpoint, engine, 6, tmp_path / "c", resume=Path(resume))
    assert (state.step, state.epoch, state.step_in_epoch) == (6, 1, 2)
    assert [m["step"] for m, _ in resumed] == [5, 6]
    assert all(m["resumed_from"] == 4 for m, _ in resumed)
    # same losses and learning rates as the uninterrupted run
    for got, want in zip(resumed, straight[4:], strict=True):
        assert got[0]["loss"] == pytest.approx(want[0]["loss"], rel=1e-5)
        assert got[0]["lr_policy"] == pytest.approx(want[0]["lr_policy"], rel=1e-9)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(next(folder.glob("*.safetensors")))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("engine", ["deepspeed", "torch"])
def test_value_warmup_freezes_the_policy_then_trains_it(tiny_checkpoint, tmp_path, engine,
                                                       process_group):
    torch.manual_seed(0)
    _, reports = run(tiny_checkpoint, engine, 3, tmp_path / "a",
                     overrides=["trainer.value_warmup_steps=2", "trainer.checkpoint_every=1"])
    folders = {m["step"]: folder for m, folder in reports}
    start = _weights(Path(tiny_checkpoint))
    assert _same(_weights(folders[1] / "policy"), start)
    assert _same(_weights(folders[2] / "policy"), start)
    assert not _same(_weights(folders[3] / "policy"), start)  # the first policy step
    assert not _same(_weights(folders[1] / "value"), _weights(folders[2] / "value"))
    # The policy's schedule starts at its first step: after it the policy is at schedule
    # step 1 (cosine start, full lr) while the value model has done all 3 (decayed to 0).
    last = reports[-1][0]
    assert last["lr_policy"] == pytest.approx(1e-3) and last["lr_value"] == pytest.approx(0.0)


class Payload:
    """Stands for any pickled object: unpickling one can run arbitrary code."""


def test_torch_resume_state_refuses_pickled_objects(tmp_path):
    from dqo_ray.train.train_engine import TorchTrainEngine

    cfg = load_config(None, ["trainer.engine=torch"]).trainer
    engine = TorchTrainEngine(torch.nn.Linear(3, 2), 1e-3, cfg)
    engine.save(tmp_path)
    engine.load(tmp_path)  # its own state: tensors and plain containers only
    state = torch.load(tmp_path / "torch_state.pt", weights_only=True)
    torch.save({**state, "extra": Payload()}, tmp_path / "torch_state.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        engine.load(tmp_path)


# -- rounds in one process --------------------------------------------------------------------


def _round_cfg(engine: str, *overrides: str):
    return load_config(None, [f"trainer.engine={engine}", "trainer.zero_stage=1",
                              f"trainer.micro_batch_size={MICRO}",
                              f"trainer.grad_accum_steps={ACCUM}", "trainer.max_steps=3",
                              "trainer.log_every=1", "trainer.checkpoint_every=3",
                              "trainer.policy_lr=1e-3", "trainer.value_lr=1e-3",
                              "trainer.lr_schedule=cosine", "trainer.warmup_steps=1",
                              *overrides])


def _train(cfg, checkpoint, scratch, rounds, models=None, state=None):
    reports = []
    io = WorkerIO(0, 1, batches_for(toy_rows()), lambda m, f: reports.append((m, f)),
                  scratch=scratch)
    models = models or build_models(cfg, str(checkpoint), torch.device("cpu"))
    state = state or TrainState()
    for r in rounds:
        state = train_round(cfg, models, io, state, r, str(checkpoint))
    return models, state, reports


@pytest.mark.parametrize("engine", ["deepspeed", "torch"])
def test_rounds_in_one_process_equal_rounds_after_a_restart(tiny_checkpoint, tmp_path, engine,
                                                            process_group):
    cfg = _round_cfg(engine)
    torch.manual_seed(0)
    _, state, kept = _train(cfg, tiny_checkpoint, tmp_path / "a", [0, 1])
    assert (state.step, state.round, state.epoch, state.step_in_epoch) == (6, 1, 0, 3)
    steps = [m["step"] for m, _ in kept]
    assert steps == [1, 2, 3, 4, 5, 6] and [m["round"] for m, _ in kept] == [0] * 3 + [1] * 3
    folders = [f.name for _, f in kept if f is not None]
    assert folders == ["checkpoint-0000003", "checkpoint-0000006"]  # global steps
    # Each round's schedule starts again (warmup included): round 1 steps at round 0's rates.
    assert [m["lr_policy"] for m, _ in kept[3:]] == pytest.approx(
        [m["lr_policy"] for m, _ in kept[:3]])
    # A new process resuming from round 0's last checkpoint trains round 1 the same way.
    resume_dir = tmp_path / "resume"
    shutil.copytree(kept[2][1], resume_dir)
    torch.manual_seed(0)
    models = build_models(cfg, str(tiny_checkpoint), torch.device("cpu"))
    state0 = resume(models, resume_dir)
    assert (state0.step, state0.round) == (3, 0)
    _, again, restarted = _train(cfg, tiny_checkpoint, tmp_path / "b", [1], models, state0)
    assert again.step == 6
    for got, want in zip(restarted, kept[3:], strict=True):
        assert got[0]["loss"] == pytest.approx(want[0]["loss"], rel=1e-5)
    # A round already trained is not trained again (a restarted group meets it on the way).
    assert _train(cfg, tiny_checkpoint, tmp_path / "c", [0], models, again)[2] == []


def test_adam_moments_reset_or_carry_across_rounds(tiny_checkpoint, tmp_path, process_group):
    losses = {}
    for mode in ("reset", "carry"):
        torch.manual_seed(0)
        cfg = _round_cfg("torch", f"trainer.optimizer_across_rounds={mode}")
        models, _, reports = _train(cfg, tiny_checkpoint, tmp_path / mode, [0, 1])
        losses[mode] = [m["loss"] for m, _ in reports]
        assert models.engines["policy"].optimizer.state  # moments exist after round 1
    assert losses["reset"][:4] == losses["carry"][:4]  # identical up to round 1's first step
    assert losses["reset"][4:] != losses["carry"][4:]  # then the moments differ


def test_a_round_that_does_not_start_where_the_last_ended_is_refused(tiny_checkpoint, tmp_path,
                                                                   process_group):
    cfg = _round_cfg("torch")
    with pytest.raises(RuntimeError, match="round 2 starts at step 6, but the trainer is at "
                                           "step 3 of round 0"):
        _train(cfg, tiny_checkpoint, tmp_path, [2], state=TrainState(step=3, round=0))
