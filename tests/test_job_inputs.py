"""Bad input at every job's entry point: one clear line naming the thing and what was
expected, exit status 2, no traceback, and nothing started (the cases fail before Ray)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from jobs import compare, evaluate, generate, ingest, pipeline, store, train

JOBS = {"train": train, "generate": generate, "evaluate": evaluate, "ingest": ingest,
        "pipeline": pipeline, "compare": compare, "store": store}


@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_checkpoint) -> Path:
    """A folder of bad inputs beside the tiny checkpoint."""
    root = tmp_path_factory.mktemp("bad")
    (root / "broken.yaml").write_text("run: {name: x\n  bad")
    (root / "list.yaml").write_text("- just\n- a list\n")
    (root / "not.parquet").write_text("not parquet at all")
    (root / "bad.jsonl").write_text('{"prompt": "a"\n')
    (root / "no-checkpoint").mkdir()
    broken = root / "broken-tokenizer"
    shutil.copytree(tiny_checkpoint, broken)
    (broken / "tokenizer.json").write_text("{ truncated")
    return root


CASES = [  # (job, arguments with {bad} and {ckpt} filled in, expected text in stderr)
    ("train", "--config {bad}/none.yaml", "cannot read config file"),
    ("train", "--config {bad}/broken.yaml", "broken.yaml"),
    ("train", "--config {bad}/list.yaml", "list.yaml"),
    ("train", "--set trainr.max_steps=3", "trainr: unknown key (did you mean 'trainer'?)"),
    ("train", "--set trainer.max_steps", "--set 'trainer.max_steps': expected key.path=value"),
    ("train", "--set trainer.max_steps=-1", "trainer.max_steps: -1 must be >= 1"),
    ("train", "--set model.policy={bad}/nowhere", "model.policy: '{bad}/nowhere' -> "),
    ("train", "--set model.policy={bad}/no-checkpoint", "is not an HF checkpoint folder"),
    ("train", "--set model.policy={ckpt} --set model.value={bad}/nowhere",
     "model.value: '{bad}/nowhere' -> "),
    ("generate", "--checkpoint {bad}/no-checkpoint",
     "--checkpoint: '{bad}/no-checkpoint' -> "),
    ("generate", "--checkpoint {bad}/broken-tokenizer",
     "{bad}/broken-tokenizer: cannot load its tokenizer"),
    ("generate", "--checkpoint {ckpt} --set task.name=gsm8k --set task.source={bad}/nowhere",
     "task.source: {bad}/nowhere: no such file or folder"),
    ("evaluate", "--checkpoint {bad}/nowhere", "--checkpoint {bad}/nowhere is not an HF "),
    ("evaluate", "--checkpoint {ckpt} --datasets gsm8k --set eval.sources.gsm8k={bad}/no.jsonl",
     "eval.sources.gsm8k: {bad}/no.jsonl: no such file or folder"),
    ("evaluate", "--checkpoint {ckpt} --datasets gsm9k", "eval.datasets[0]: 'gsm9k' is not"),
    ("ingest", "--input {bad}/missing.jsonl --tokenizer {ckpt}", "{bad}/missing.jsonl"),
    ("ingest", "--input {bad}/not.parquet --tokenizer {ckpt}", "{bad}/not.parquet"),
    ("ingest", "--input {bad}/bad.jsonl --tokenizer {ckpt} --strict", "bad.jsonl line 1"),
    ("ingest", "--input {bad}/bad.jsonl --tokenizer {bad}/broken-tokenizer",
     "{bad}/broken-tokenizer: cannot load its tokenizer"),
    ("ingest", "--input {bad}/bad.jsonl --round -1 --tokenizer {ckpt}", "--round must be >= 0"),
    ("pipeline", "--config {bad}/broken.yaml", "broken.yaml"),
    ("pipeline", "--set task.name=gsm8k --set task.source={bad}/nowhere",
     "task.source: {bad}/nowhere: no such file or folder"),
    ("pipeline", "--set eval.datasets=[gsm8k] --set eval.sources.gsm8k={bad}/nowhere",
     "eval.sources.gsm8k: {bad}/nowhere: no such file or folder"),
    ("pipeline", "--set model.policy={bad}/no-checkpoint", "model.policy: "),
    ("compare", "--set compare.algos=[dqo,ppo]", "compare.algos[1]: 'ppo' is not one of"),
    ("compare", "--set task.name=math --set task.source={bad}/nowhere",
     "task.source: {bad}/nowhere: no such file or folder"),
    ("store", "verify --set data.stor=x", "data.stor: unknown key (did you mean 'store'?)"),
]


@pytest.mark.parametrize(("job", "args", "expected"), CASES,
                         ids=[f"{j}-{i}" for i, (j, _, _) in enumerate(CASES)])
def test_bad_input_is_one_clear_line_and_exit_2(job, args, expected, bad, tiny_checkpoint,
                                                tmp_path, capsys):
    fill = {"bad": bad, "ckpt": tiny_checkpoint}
    argv = args.format(**fill).split() + ["--set", f"run.output_dir={tmp_path}/runs"]
    assert JOBS[job].main(argv) == 2
    err = capsys.readouterr().err
    assert expected.format(**fill) in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists() or job in ("train", "generate")  # nothing ran
