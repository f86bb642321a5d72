"""The task table, task data sets (local files, errors) and prompts (chat / plain templates,
k-shot, stop strings)."""

import json
from pathlib import Path
from typing import get_args

import pytest
from conftest import repo_data

from dqo_ray.config import TaskConfig, TaskName
from dqo_ray.tasks import (
    TASKS,
    DatasetFormatError,
    Problem,
    build_prompt,
    get_task,
    grade,
    load_problems,
    render_solution,
    resolve_source,
    select_exemplars,
    stop_strings,
)
from dqo_ray.tasks.items import prompt_items

# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------

def test_config_task_names_are_the_task_table():
    assert list(get_args(TaskName)) == list(TASKS)
    assert all(TASKS[name].name == name for name in TASKS)
    with pytest.raises(ValueError, match="unknown task 'chess'; known: gsm8k, math, math500"):
        get_task("chess")


def test_math_and_math500_differ_only_in_their_records():
    """MATH500 is graded, prompted and voted exactly as MATH (one grader, no alias table)."""
    math, math500 = TASKS["math"], TASKS["math500"]
    for field in ("instruction", "render_solution", "grade", "grade_batch", "answer_key",
                  "plain_stop"):
        assert getattr(math500, field) is getattr(math, field), field
    assert math500.parse is not math.parse
    assert (math.file_stems("test"), math500.file_stems("test")) == \
        (("test",), ("math500_test", "test"))


@pytest.fixture(scope="module")
def gsm8k_train():
    return load_problems("gsm8k", str(repo_data("gsm8k")), "train")


@pytest.fixture(scope="module")
def math_train():
    return load_problems("math", str(repo_data("math")), "train")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def test_gsm8k_counts_and_fields(gsm8k_train):
    test = load_problems("gsm8k", str(repo_data("gsm8k")), "test")
    assert (len(gsm8k_train), len(test)) == (7473, 1319)
    first = test[0]
    assert first.problem_id == "gsm8k/test/0" and first.dataset == "gsm8k"
    assert first.question.startswith("Janet\u2019s ducks lay 16 eggs")
    assert first.answer == "18" and first.solution.endswith("#### 18")
    assert first.meta == {"split": "test"}
    everything = gsm8k_train + test
    assert len({p.problem_id for p in everything}) == 7473 + 1319
    assert all("," not in p.answer for p in everything)
    assert sum(p.answer.startswith("-") for p in everything) == 5  # per SOURCE.md
    commas = [p for p in everything if "," in p.solution.rsplit("####", 1)[1]]
    assert len(commas) == 93 and all(p.answer.isdigit() for p in commas)


def test_math_counts_and_fields(math_train):
    folder = str(repo_data("math"))
    test = load_problems("math", folder, "test")
    assert (len(math_train), len(test)) == (7500, 5000)
    by_id = {p.problem_id: p for p in test}
    assert len(by_id) == 5000
    p = by_id["test/precalculus/807.json"]
    assert p.answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert p.meta == {"split": "test", "level": "Level 2", "type": "Precalculus"}
    # The one problem that uses \fbox in its statement; the answer is the solution's box.
    fbox = [q for q in test if "\\fbox" in q.question]
    assert len(fbox) == 1 and fbox[0].answer == "144"
    # Brace-less `\boxed 9` in train.
    assert sum(q.answer in ("2", "9", "17") and "\\boxed " in q.solution
               for q in math_train) == 3
    assert {q.meta["split"] for q in math_train} == {"train"}
    # Two train solutions box nothing (`\boxed{}` in the source): kept, flagged, never drawn
    # as exemplars.
    empty = [q for q in math_train if not q.answer]
    assert [q.problem_id for q in empty] == ["train/number_theory/7115.json",
                                             "train/number_theory/7117.json"]
    assert all(q.meta["empty_answer"] for q in empty)
    drawn = {q.problem_id for q in select_exemplars(math_train, 7498, seed=0)}
    assert len(drawn) == 7498 and not drawn & {q.problem_id for q in empty}


def test_math500(math_train):
    folder = str(repo_data("math"))
    m500 = load_problems("math500", folder, "test")
    assert len(m500) == 500
    first = m500[0]
    assert first.problem_id == "test/precalculus/807.json" and first.dataset == "math500"
    assert first.answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert first.meta == {"split": "test", "level": 2, "subject": "Precalculus"}
    # The same ids as MATH test (so training can exclude them).
    math_ids = {p.problem_id for p in load_problems("math", folder, "test")}
    assert {p.problem_id for p in m500} <= math_ids
    # MATH500 has no train split: its exemplars come from the MATH train file.
    train = load_problems("math500", folder, "train")
    assert [p.problem_id for p in train] == [p.problem_id for p in math_train]
    assert [p.answer for p in train] == [p.answer for p in math_train]


def test_limit_and_direct_file(math_train):
    folder = repo_data("math")
    five = load_problems("math", str(folder), "train", limit=5)
    assert five == math_train[:5]
    assert load_problems("math", str(folder / "train.jsonl"), "train", limit=5) == five
    assert len(load_problems("math500", str(folder / "math500_test.jsonl"), "test",
                             limit=3)) == 3
    with pytest.raises(ValueError, match="limit must be >= 1"):
        load_problems("math", str(folder), "train", limit=0)


def test_parquet_source_matches_jsonl(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    src = repo_data("gsm8k") / "test.jsonl"
    rows = [json.loads(line) for line in src.read_text().splitlines()[:20]]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "test.parquet")
    from_parquet = load_problems("gsm8k", str(tmp_path), "test")
    assert from_parquet == load_problems("gsm8k", str(src), "test", limit=20)


def _write(path: Path, lines: list) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


@pytest.mark.parametrize("task, bad, message", [
    ("gsm8k", {"question": "q"}, "missing field 'answer'"),
    ("gsm8k", {"question": "q", "answer": "it is 4"}, "no '#### <answer>' line"),
    ("gsm8k", {"question": "q", "answer": "x\n#### four"}, "not a number: 'four'"),
    ("gsm8k", {"question": 3, "answer": "#### 4"}, "'question' must be a string"),
    ("math", {"problem": "p", "solution": "so it is 4"}, "no complete \\\\boxed"),
    ("math", {"problem": "p", "solution": "\\boxed{4"}, "no complete \\\\boxed"),
    ("math500", {"problem": "p", "answer": " "}, "'answer' is empty"),
    ("gsm8k", '{"question": "q", ', "invalid JSON"),
    ("gsm8k", "[1, 2]", "expected a JSON object"),
])
def test_malformed_record_names_file_and_line(tmp_path, task, bad, message):
    good = {"gsm8k": {"question": "q", "answer": "2+2=4\n#### 4"},
            "math": {"problem": "p", "solution": "$\\boxed{4}$"},
            "math500": {"problem": "p", "answer": "4"}}[task]
    path = _write(tmp_path / "train.jsonl", [good, "", bad])  # the blank line still counts
    with pytest.raises(DatasetFormatError, match=rf"{path}:3: .*{message}"):
        load_problems(task, str(path), "train")
    assert len(load_problems(task, str(path), "train", limit=1)) == 1  # stops before line 3


def test_missing_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.jsonl"):
        load_problems("gsm8k", str(tmp_path), "train")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_problems("gsm8k", str(tmp_path / "nope.jsonl"), "train")
    with pytest.raises(ValueError, match="unknown task 'chess'"):
        load_problems("chess", str(tmp_path), "train")
    with pytest.raises(ValueError, match="unknown task 'chess'"):
        resolve_source("chess", None, "train")


def test_hub_resolution_without_touching_the_hub():
    assert resolve_source("gsm8k", None, "train") == ("openai/gsm8k", "main")
    assert resolve_source("gsm8k", "openai/gsm8k", "test") == ("openai/gsm8k", "main")
    assert resolve_source("math500", None, "test") == ("HuggingFaceH4/MATH-500", None)
    assert resolve_source("math", "someone/math:algebra", "test") == ("someone/math", "algebra")
    folder = repo_data("math")
    assert resolve_source("math500", str(folder), "test") == folder / "math500_test.jsonl"
    assert resolve_source("math", str(folder), "test") == folder / "test.jsonl"


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------

PROBLEM = Problem("toy/0", "gsm8k", "Tom has 3 apples. How many left?", "3", None)


def _plain_tokenizer():
    from dqo_ray.models import build_word_tokenizer

    tok = build_word_tokenizer()
    tok.chat_template = None
    return tok


def test_chat_template_used_when_present(tiny_checkpoint):
    from dqo_ray.models import load_tokenizer

    tok = load_tokenizer(tiny_checkpoint)
    prompt = build_prompt(PROBLEM, tok, task="gsm8k")
    instruction = get_task("gsm8k").instruction
    expected = tok.apply_chat_template(
        [{"role": "user", "content": f"{instruction}\n\n{PROBLEM.question}"}],
        tokenize=False, add_generation_prompt=True)
    assert prompt == expected
    assert prompt == f"user: {instruction}\n\n{PROBLEM.question}\nassistant:"
    assert "The answer is <number>." in prompt
    assert stop_strings(tok, task="gsm8k") == []
    # Turning the template off gives the plain form even though the tokenizer has one.
    plain = build_prompt(PROBLEM, tok, task="gsm8k", use_chat_template=False)
    assert plain == f"{instruction}\n\nQuestion: {PROBLEM.question}\nAnswer:"
    assert stop_strings(tok, task="gsm8k", use_chat_template=False) == ["\nQuestion:"]


def test_plain_template_without_chat_template():
    tok = _plain_tokenizer()
    prompt = build_prompt(PROBLEM, tok, task="math")
    assert prompt == (f"{get_task('math').instruction}\n\n"
                      f"Question: {PROBLEM.question}\nAnswer:")
    assert "\\boxed{}" in prompt
    assert build_prompt(PROBLEM, None, task="gsm8k").endswith("\nAnswer:")
    assert stop_strings(tok, task="math") == ["\nQuestion:"]
    assert stop_strings(None, task="gsm8k") == ["\nQuestion:"]


def test_prompt_items_carry_the_stop_strings_of_their_template(tiny_checkpoint):
    """The wire from the task to sampling: items say where their responses stop, and the
    generator and evaluator put that into their SamplingSpec (tests/test_engines.py)."""
    from dqo_ray.models import load_tokenizer

    tok = load_tokenizer(tiny_checkpoint)
    problems = [PROBLEM]
    chat = prompt_items(problems, tok, TaskConfig(name="gsm8k"))
    plain = prompt_items(problems, tok, TaskConfig(name="gsm8k", use_chat_template=False))
    bare = prompt_items(problems, _plain_tokenizer(), TaskConfig(name="math500"))
    assert [i.stop for i in chat + plain + bare] == [(), ("\nQuestion:",), ("\nQuestion:",)]
    assert plain[0].prompt.endswith("\nAnswer:") and bare[0].task == "math500"


def test_exemplars_deterministic_and_train_only(gsm8k_train):
    a = select_exemplars(gsm8k_train, 8, seed=0)
    assert a == select_exemplars(gsm8k_train, 8, seed=0)
    assert [p.problem_id for p in a] != [p.problem_id for p in
                                         select_exemplars(gsm8k_train, 8, seed=1)]
    assert len({p.problem_id for p in a}) == 8
    assert all(p.problem_id.startswith("gsm8k/train/") for p in a)
    test = load_problems("gsm8k", str(repo_data("gsm8k")), "test", limit=50)
    with pytest.raises(ValueError, match="train split"):
        select_exemplars(test, 2, seed=0)
    with pytest.raises(ValueError, match="asked for 9"):
        select_exemplars(gsm8k_train[:8], 9, seed=0)


def test_gsm8k_k_shot_prompt(gsm8k_train):
    shots = select_exemplars(gsm8k_train, 8, seed=0)
    prompt = build_prompt(PROBLEM, _plain_tokenizer(), task="gsm8k", k_shot=8, exemplars=shots)
    blocks = prompt.split("\n\n")
    assert blocks[0] == get_task("gsm8k").instruction
    assert prompt.count("Question: ") == 9 and prompt.endswith(f"{PROBLEM.question}\nAnswer:")
    for shot, block in zip(shots, prompt.split("Question: ")[1:-1], strict=True):
        assert block.startswith(shot.question)
        assert block.rstrip().endswith(f"The answer is {shot.answer}.")
    assert "<<" not in prompt and "####" not in prompt
    # The rendered exemplars are graded correct, i.e. prompt form and grader agree.
    assert all(grade("gsm8k", render_solution(s, "gsm8k"), s.answer) for s in gsm8k_train[:300])


def test_math_k_shot_chat_prompt(math_train, tiny_checkpoint):
    from dqo_ray.models import load_tokenizer

    tok = load_tokenizer(tiny_checkpoint)
    shots = select_exemplars(math_train, 4, seed=3)
    assert shots == select_exemplars(math_train, 4, seed=3)
    problem = load_problems("math500", str(repo_data("math")), "test", limit=1)[0]
    prompt = build_prompt(problem, tok, task="math500", k_shot=4, exemplars=shots)
    assert prompt.count("user: ") == 5 and prompt.count("\nassistant: ") == 4
    assert prompt.endswith(f"{problem.question}\nassistant:")
    for shot in shots:
        assert f"assistant: {shot.solution.strip()}\n" in prompt
        assert grade("math", render_solution(shot, "math"), shot.answer)


def test_exemplar_never_quotes_the_problem_itself(gsm8k_train):
    target, other, spare = gsm8k_train[:3]
    prompt = build_prompt(target, None, task="gsm8k", k_shot=2,
                          exemplars=[target, other, spare])
    assert prompt.count(target.question) == 1  # only as the question being asked
    assert other.question in prompt and spare.question in prompt
    with pytest.raises(ValueError, match="only 1 usable exemplars"):
        build_prompt(target, None, task="gsm8k", k_shot=2, exemplars=[target, other])
    with pytest.raises(ValueError, match="needs exemplars"):
        build_prompt(target, None, task="gsm8k", k_shot=2)
    with pytest.raises(ValueError, match="unknown task 'chess'"):
        build_prompt(target, None, task="chess")
