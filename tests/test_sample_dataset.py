"""The embedded sample set (docs/dataset.md) keeps the promises its documentation makes."""

import json
import re

import pytest

from detoxrl.config import DataConfig
from detoxrl.data import sample_dataset_path

ROWS = [json.loads(line) for line in sample_dataset_path().read_text(encoding="utf-8").splitlines()]
FILTER = DataConfig()  # the training length filter the preset keeps
TURN = re.compile(r"^#Person[123]#: \S")


def test_rows_have_the_documented_schema_and_unique_ids_and_topics():
    assert all(list(row) == ["id", "dialogue", "summary", "topic", "heated"] for row in ROWS)
    assert [row["id"] for row in ROWS] == [f"heated_{n:03d}" for n in range(1, len(ROWS) + 1)]
    assert len({row["topic"] for row in ROWS}) == len(ROWS)
    assert all(isinstance(row["heated"], bool) for row in ROWS)


def test_dialogues_are_dialogsum_turns_inside_the_training_length_filter():
    for row in ROWS:
        turns = row["dialogue"].split("\n")
        assert 6 <= len(turns) <= 9, row["id"]
        assert all(TURN.match(turn) for turn in turns), row["id"]
        assert FILTER.min_chars < len(row["dialogue"]) <= FILTER.max_chars, row["id"]
        assert "#Person1#" in row["summary"] or "#Person2#" in row["summary"], row["id"]


def test_no_two_dialogues_are_near_duplicates():
    def trigrams(text):
        words = re.findall(r"\w+", text.lower())
        return {tuple(words[i:i + 3]) for i in range(len(words) - 2)}

    sets = [trigrams(row["dialogue"]) for row in ROWS]
    worst = max(len(a & b) / len(a | b) for i, a in enumerate(sets) for b in sets[i + 1:])
    assert worst < 0.1


def test_reference_summaries_are_clean_for_the_training_scorer():
    pytest.importorskip("profanity_check")
    from detoxrl.rewards import ProfanityScorer

    scores = ProfanityScorer().toxicity([row["summary"] for row in ROWS])
    assert scores.max() < 0.5


def test_the_fresh_test_split_passes_its_recipes_checks_against_both_files():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    fresh = sample_dataset_path("heated_dialogsum_fresh")
    done = subprocess.run([sys.executable, str(root / "scripts" / "check_dialogues.py"), str(fresh),
                           "--against", str(sample_dataset_path())], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout
    assert done.stdout.strip().splitlines()[-1] == "184 of 184 rows pass"
