"""The quality harness's tasks and bookkeeping (bench/quality*.py) with the bundled model's tokenizer."""

from __future__ import annotations

import math

import pytest

from bench.quality import by_depth, groups_done, page_aligned
from bench.quality_tasks import TASKS, chat_frame, haystack, is_right


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_fact_is_in_the_haystack_once_at_its_depth(tokenizer, name: str):
    task = TASKS[name]
    prefix, questions = haystack(tokenizer, task, 2048, task.needles, 0, 1)
    text = tokenizer.decode(prefix)
    assert 1900 < len(prefix) <= 2048 - 24
    assert len(questions) == task.needles
    for q in questions:
        assert text.count(f" {q.answer}.") == 1  # the value sits in exactly one sentence
        assert 0 < q.depth < 1
        at = text.index(f" {q.answer}.") / len(text)
        assert abs(at - q.depth) < 0.1  # the recorded depth is where it is (in characters, roughly)
    if task.chat:
        assert chat_frame(tokenizer)[1].strip() in tokenizer.decode(questions[0].ids)  # asked as a chat


def test_questions_are_page_aligned_so_repeats_hit_the_prefix_cache():
    ids = page_aligned(list(range(100)), [7, 8, 9], [0], 16)
    assert len(ids) % 16 == 1 and ids[-3:] == [7, 8, 9]


def test_answers_are_checked_on_the_reply_start_ignoring_case_and_spaces():
    assert is_right(" 4817 293.", "4817293") and is_right(" Paris.", "paris")
    assert not is_right(" The answer is 4817293", "4817293")


def test_resume_counts_whole_haystacks_and_trusts_old_numbers():
    assert groups_done(None, 5) == 0 and groups_done(18.0, 25) == math.inf
    assert groups_done({"right": [1] * 12, "depth": [0.5] * 12}, 5) == 2


def test_depth_buckets():
    cell = {"right": [1, 0, 1, 1], "depth": [0.1, 0.15, 0.5, 0.99]}
    assert by_depth(cell) == [50.0, None, 100.0, None, 100.0]
