"""The synthetic tinymath task: generator, splits, solutions, grading, prompts, tokenizer."""

import hashlib
import json
import re
import subprocess
import sys
import time
from itertools import pairwise

import pytest
from conftest import REPO

from dqo_ray.config import TaskConfig
from dqo_ray.evaluation.metrics import answer_key
from dqo_ray.models import build_word_tokenizer
from dqo_ray.tasks import (
    TINYMATH_WORDS,
    DatasetFormatError,
    build_prompt,
    grade,
    grade_many,
    load_problems,
    render_solution,
)
from dqo_ray.tasks import tinymath as tm
from dqo_ray.tasks.items import load_items
from dqo_ray.tasks.tinymath_flaws import drop_answer_line, flip_subtractions

N = 20_000  # per split: the task must offer at least this many distinct problems
EQUATION = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+)\.")
ANSWER_LINE = re.compile(r"The answer is (\d+)\.")


@pytest.fixture(scope="module")
def splits():
    return {split: load_problems("tinymath", None, split, N) for split in tm.SPLITS}


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer(TINYMATH_WORDS)


def _equations(solution):
    """[(a, op, b, result)] of a solution, checking that its last line is the answer line."""
    *lines, last = solution.split("\n")
    parsed = []
    for line in lines:
        m = EQUATION.fullmatch(line)
        assert m, f"not an equation line: {line!r}"
        parsed.append((int(m[1]), m[2], int(m[3]), int(m[4])))
    m = ANSWER_LINE.fullmatch(last)
    assert m, f"not an answer line: {last!r}"
    return parsed, int(m[1])


def _digest(problems):
    text = "\x00".join(f"{p.problem_id}|{p.question}|{p.solution}|{p.answer}" for p in problems)
    return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Splits and determinism
# --------------------------------------------------------------------------------------------

def test_every_split_has_n_distinct_problems_with_ids_and_meta(splits):
    for split, problems in splits.items():
        assert len(problems) == N
        assert len({p.question for p in problems}) == N
        assert [p.problem_id for p in problems[:3]] == [f"tinymath/{split}/{i}" for i in range(3)]
        assert problems[-1].problem_id == f"tinymath/{split}/{N - 1}"
        assert all(p.dataset == "tinymath" and p.meta["split"] == split for p in problems)


def test_splits_never_share_a_problem(splits):
    warm, train, test = ({p.question for p in splits[s]} for s in ("warm", "train", "test"))
    assert not warm & train and not warm & test and not train & test
    # By construction: the split is a function of the question text, in any universe.
    assert all(tm.split_of(p.question) == split for split, ps in splits.items() for p in ps)
    other = {p.question for p in load_problems("tinymath", "seed=1", "train", 2000)}
    assert not other & test and not other & warm
    assert other - train  # another universe really is another stream


def test_same_problems_on_every_call_as_prefixes(splits):
    again = load_problems("tinymath", None, "test", 300)
    assert _digest(again) == _digest(splits["test"][:300])
    tm._STREAMS.clear()  # a cold cache, asked for a shorter list first
    assert _digest(load_problems("tinymath", None, "test", 10)) == _digest(again[:10])
    assert _digest(load_problems("tinymath", None, "test", 300)) == _digest(again)
    # Fresh Problem objects: a caller editing one does not change later calls.
    again[0].meta["level"] = "edited"
    assert load_problems("tinymath", None, "test", 1)[0].meta["level"] != "edited"


def test_same_problems_in_another_process(splits):
    code = ("import hashlib; from dqo_ray.tasks import load_problems\n"
            "ps = load_problems('tinymath', None, 'train', 200)\n"
            "print(hashlib.sha256('\\x00'.join(f'{p.problem_id}|{p.question}|{p.solution}|"
            "{p.answer}' for p in ps).encode()).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO, env={"PYTHONHASHSEED": "12345"})
    assert out.stdout.strip() == _digest(splits["train"][:200])


def test_limit_none_gives_the_default_size_and_seeds_pick_universes():
    assert len(load_problems("tinymath", None, "test")) == tm.DEFAULT_SIZES["test"]
    a = load_problems("tinymath", "seed=3", "test", 50)
    b = load_problems("tinymath", "seed=4", "test", 50)
    assert [p.question for p in a] != [p.question for p in b]
    assert _digest(a) == _digest(load_problems("tinymath", "seed=3", "test", 50))


def test_generation_is_fast():
    start = time.process_time()
    problems = load_problems("tinymath", "seed=99", "test", 5000)  # a cold stream
    # ~0.4 s of CPU measured for the rarest split; a wide margin for busy machines.
    assert time.process_time() - start < 3.0
    assert len(problems) == 5000


def test_clear_errors():
    with pytest.raises(ValueError, match="tinymath has no split 'dev'; known: warm, train, test"):
        load_problems("tinymath", None, "dev", 5)
    with pytest.raises(ValueError, match="seed=<integer>"):
        load_problems("tinymath", "seed=abc", "test", 5)
    with pytest.raises(ValueError, match="no hub dataset"):
        load_problems("tinymath", "someone/tinymath", "test", 5)
    with pytest.raises(ValueError, match="limit must be >= 1"):
        load_problems("tinymath", None, "test", 0)


def test_a_local_file_of_records(tmp_path, splits):
    records = [{"question": p.question, "answer": p.answer, "solution": p.solution}
               for p in splits["test"][:3]]
    records.append({"question": "Tom has 2 apples. How many apples does Tom have now?",
                    "answer": 2})
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    loaded = load_problems("tinymath", str(tmp_path), "test")
    assert [(p.question, p.answer, p.solution) for p in loaded[:3]] == \
        [(p.question, p.answer, p.solution) for p in splits["test"][:3]]
    assert loaded[3].answer == "2" and loaded[3].problem_id == "tinymath/test/3"
    assert render_solution(loaded[3], "tinymath") == "The answer is 2."
    path.write_text(json.dumps({"question": "q", "answer": "7.5"}) + "\n")
    with pytest.raises(DatasetFormatError, match="test.jsonl:1: field 'answer'"):
        load_problems("tinymath", str(path), "test")


# --------------------------------------------------------------------------------------------
# Problems and solutions
# --------------------------------------------------------------------------------------------

def test_solutions_are_correct_chains_within_range(splits):
    for problems in splits.values():
        for p in problems[:5000]:
            equations, answer = _equations(p.solution)
            assert len(equations) == p.meta["level"]
            assert 2 <= len(equations) <= 4
            for a, op, b, result in equations:
                assert result == {"+": a + b, "-": a - b, "*": a * b}[op]
                assert all(1 <= x <= tm.MAX_VALUE for x in (a, b, result))
            # Each step works on the previous result (a boxes-of start is a fresh product).
            for (_, _, _, prev), (a, _, _, _) in pairwise(equations):
                assert a == prev
            assert answer == equations[-1][3] == int(p.answer)
            # Every number of the question is an operand of the solution, and >= 2.
            numbers = [int(x) for x in re.findall(r"\d+", p.question)]
            operands = [x for a, op, b, _ in equations for x in (a, b)]
            assert all(2 <= x <= tm.MAX_VALUE and x in operands for x in numbers)


def test_step_counts_and_operations_are_varied(splits):
    problems = splits["train"][:3000]
    levels = [p.meta["level"] for p in problems]
    for steps in (2, 3, 4):
        assert 0.25 < levels.count(steps) / len(levels) < 0.42
    ops = [op for p in problems for _, op, _, _ in _equations(p.solution)[0]]
    assert all(ops.count(op) > 0.2 * len(ops) for op in "+-*")


# The meaning of each sentence, read independently of the generator's tables.
_SENTENCE_OPS = [
    (re.compile(r"(He|She) (buys|finds|gets) (?P<k>\d+) more \w+"), "+"),
    (re.compile(r"[A-Z][a-z]+ gives (him|her) (?P<k>\d+) \w+"), "+"),
    (re.compile(r"(He|She) (gives away|loses|sells|eats) (?P<k>\d+) \w+"), "-"),
    (re.compile(r"(He|She) gives (?P<k>\d+) \w+ to [A-Z][a-z]+"), "-"),
    (re.compile(r"(He|She) doubles (his|her) \w+"), "*", 2),
    (re.compile(r"(He|She) triples (his|her) \w+"), "*", 3),
    (re.compile(r"Then (he|she) has (?P<k>\d+) times as many \w+"), "*"),
]


def test_the_words_decide_the_operation(splits):
    seen = set()
    for p in splits["warm"][:5000]:
        sentences = p.question.rstrip("?").split(". ")
        equations, _ = _equations(p.solution)
        boxes = sentences[1].startswith("Each ")
        if boxes:  # "<name> has a <containers> of <noun>. Each <container> holds b <noun>"
            a, op, b, _ = equations.pop(0)
            assert op == "*" and sentences[0].split()[2] == str(a)
            assert sentences[1].split()[2:4] == ["holds", str(b)]
        else:  # "<name> has a <noun>"
            assert sentences[0].split()[2] == str(equations[0][0])
        events = sentences[2 if boxes else 1:-1]
        assert sentences[-1].startswith("How many ")
        assert len(events) == len(equations)
        for sentence, (_, op, b, _) in zip(events, equations, strict=True):
            matches = [(m, rule) for rule in _SENTENCE_OPS if (m := rule[0].fullmatch(sentence))]
            assert len(matches) == 1, sentence
            m, (pattern, meaning, *fixed_k) = matches[0]
            seen.add(pattern.pattern)
            assert op == meaning, sentence
            assert str(b) == (str(fixed_k[0]) if fixed_k else m["k"]), sentence
    assert len(seen) == len(_SENTENCE_OPS)  # every template is in use


def test_pronouns_follow_the_name(splits):
    female = set(tm._FEMALE)
    for p in splits["test"][:2000]:
        name = p.question.split(" ", 1)[0]
        wrong = {"He", "he", "his", "him"} if name in female else {"She", "she", "her"}
        assert not wrong & set(re.findall(r"[A-Za-z]+", p.question))


# --------------------------------------------------------------------------------------------
# Grading
# --------------------------------------------------------------------------------------------

def test_grader_accepts_gold_solutions_and_rejects_others(splits):
    problems = splits["test"][:1000]
    assert all(grade("tinymath", p.solution, p.answer) for p in problems)
    assert grade_many("tinymath", [p.solution for p in problems],
                      [p.answer for p in problems]) == [True] * len(problems)
    wrong = [p.solution.replace(f"The answer is {p.answer}.",
                                f"The answer is {int(p.answer) + 1}.") for p in problems]
    assert grade_many("tinymath", wrong, [p.answer for p in problems]) == [False] * len(problems)
    # The answer key used for majority voting agrees with the answer line.
    assert all(answer_key("tinymath", p.solution) == p.answer for p in problems[:200])


@pytest.mark.parametrize("response, ok", [
    ("3 + 4 = 7.\nThe answer is 7.", True),
    ("The answer is 7", True),
    ("The answer is  007.", True),
    ("The answer is 5.\nNo wait.\nThe answer is 7.", True),   # the last one counts
    ("The answer is 7.\nThe answer is 5.", False),
    ("The answer is 7.\nThe answer is", False),               # a bare last anchor: no answer
    ("3 + 4 = 7.", False),                                    # no answer line
    ("", False),
    ("The answer is 7.5.", False),
    ("The answer is 71.", False),
    ("The answer is -7.", False),
    ("the answer is 7.", False),                               # the taught form is exact
    ("The answer is " + "7" * 5000, False),
])
def test_grader_cases(response, ok):
    assert grade("tinymath", response, "7") is ok


@pytest.mark.parametrize("response, kind", [
    ("3 * 4 = 12.\n12 - 5 = 7.\nThe answer is 7.", None),
    ("3 * 4 = 12.\n12 - 5 = 7.", "no answer line"),
    ("3 * 4 = 12.\n12 - 5 = 7.\nThe answer is", "no answer line"),
    ("3 * 4 = 12.\n12 - 5 = 8.\nThe answer is 8.", "arithmetic"),
    ("3 * 4 = 12.\n12 - 5 = 7.\nThe answer is 12.", "answer is not the last result"),
    ("3 * 4 = 12.\n12 + 5 = 17.\nThe answer is 17.", "wrong steps"),
    ("The answer is 9.", "wrong steps"),                      # no step to blame
])
def test_error_kind_names_why_a_response_is_wrong(response, kind):
    assert tm.error_kind(response, "7") == kind
    assert kind is None or kind in tm.ERROR_KINDS


def test_grader_never_raises_on_odd_input():
    assert grade("tinymath", None, "7") is False
    assert grade("tinymath", "The answer is 7.", "seven") is False
    assert grade_many("tinymath", ["The answer is 7.", 3], ["7", "7"]) == [True, False]


# --------------------------------------------------------------------------------------------
# Prompts and the tiny tokenizer
# --------------------------------------------------------------------------------------------

def test_chat_prompt_is_short_and_solutions_render_as_is(splits, tokenizer):
    p = splits["test"][0]
    prompt = build_prompt(p, tokenizer, task="tinymath")
    assert prompt == f"user: Solve step by step.\n\n{p.question}\nassistant:"
    assert render_solution(p, "tinymath") == p.solution
    plain = build_prompt(p, None, task="tinymath")
    assert plain == f"Solve step by step.\n\nQuestion: {p.question}\nAnswer:"


def test_tiny_tokenizer_knows_every_word(splits, tokenizer):
    assert all(w.isascii() and w.isalpha() for w in TINYMATH_WORDS)
    assert len(tokenizer) < 300
    unk = tokenizer.unk_token_id
    for split, problems in splits.items():
        for p in problems[:2000]:
            prompt = build_prompt(p, tokenizer, task="tinymath")
            for text in (prompt, p.solution):
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                assert unk not in ids, (split, text)
                assert tokenizer.decode(ids) == text
            assert len(tokenizer(prompt + " " + p.solution)["input_ids"]) <= 128


def test_load_items(tokenizer):
    items = load_items(TaskConfig(name="tinymath", split="test", limit=50), tokenizer)
    problems = load_problems("tinymath", None, "test", 50)
    assert [i.prompt_id for i in items] == [p.problem_id for p in problems]
    assert [i.gold for i in items] == [p.answer for p in problems]
    assert {i.task for i in items} == {"tinymath"}
    assert all(tokenizer.unk_token_id not in i.prompt_ids for i in items)
    assert dict(items[0].meta) == {"split": "test", "level": problems[0].meta["level"]}
    # k-shot prompts draw their exemplars from the train split.
    shot = load_items(TaskConfig(name="tinymath", split="test", limit=2, k_shot=1), tokenizer)
    assert shot[0].prompt.count("user:") == 2
    assert tokenizer.unk_token_id not in shot[0].prompt_ids


def test_flip_subtractions_writes_some_subtractions_as_additions_and_carries_the_count(splits):
    problems = splits["warm"][:2000]
    subtractions = flipped = 0
    for p in problems:
        flawed = flip_subtractions(p.solution, 0.5, p.problem_id)
        assert flawed == flip_subtractions(p.solution, 0.5, p.problem_id)  # stable
        assert flip_subtractions(p.solution, 0.0, p.problem_id) == p.solution
        gold, _ = _equations(p.solution)
        wrong, answer = _equations(flawed)
        for (a, op, b, result), (_, gold_op, gold_b, _) in zip(wrong, gold, strict=True):
            assert b == gold_b and result == {"+": a + b, "-": a - b, "*": a * b}[op]
            assert op == gold_op or (gold_op, op) == ("-", "+")
            subtractions += gold_op == "-"
            flipped += (gold_op, op) == ("-", "+")
        for (_, _, _, prev), (a, _, _, _) in pairwise(wrong):
            assert a == prev
        assert answer == wrong[-1][3]
        assert (answer == int(p.answer)) == (flawed == p.solution)
    assert 0.45 < flipped / subtractions < 0.55
    assert flip_subtractions(p.solution, 1.0, p.problem_id).count(" - ") == 0


def test_warm_start_examples_carry_the_configured_flaw(tokenizer):
    from dqo_ray.config import load_config
    from dqo_ray.train.warm_start import warm_start_examples

    def targets(flaw: str, rate: float) -> list[list[int]]:
        cfg = load_config(REPO / "configs" / "demo.yaml", [  # (the demo drops answer lines)
            "pipeline.warm_start.problems=60", "pipeline.warm_start.flip_subtractions=0",
            "pipeline.warm_start.drop_answer_line=0", f"pipeline.warm_start.{flaw}={rate}"])
        return [e.target_ids for e in warm_start_examples(cfg, tokenizer)]

    problems = load_problems("tinymath", None, "warm", 60)
    clean = targets("flip_subtractions", 0.0)
    for flaw, function in (("flip_subtractions", flip_subtractions),
                           ("drop_answer_line", drop_answer_line)):
        flawed = targets(flaw, 0.5)
        for p, bad, good in zip(problems, flawed, clean, strict=True):
            assert tokenizer.decode(good[:-1]) == p.solution
            assert tokenizer.decode(bad[:-1]) == function(p.solution, 0.5, p.problem_id)
            assert bad[-1] == good[-1] == tokenizer.eos_token_id
        assert sum(b != g for b, g in zip(flawed, clean, strict=True)) > 10


def test_drop_answer_line_leaves_out_the_stated_answer_at_the_given_rate(splits):
    problems = splits["warm"][:2000]
    dropped = 0
    for p in problems:
        flawed = drop_answer_line(p.solution, 0.5, p.problem_id)
        assert flawed == drop_answer_line(p.solution, 0.5, p.problem_id)  # stable
        assert drop_answer_line(p.solution, 0.0, p.problem_id) == p.solution
        assert drop_answer_line(p.solution, 1.0, p.problem_id) + "\n" + \
            p.solution.split("\n")[-1] == p.solution
        if flawed != p.solution:
            dropped += 1
            assert p.solution.startswith(flawed + "\n")
            assert not tm.grade(flawed, p.answer) and tm.grade(p.solution, p.answer)
    assert 0.45 < dropped / len(problems) < 0.55
    assert drop_answer_line("2 + 3 = 5.", 1.0, "k") == "2 + 3 = 5."  # no answer line
