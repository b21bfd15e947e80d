"""The written checks of detoxrl's heated-dialogue recipe (docs/dataset.md), for new dialogues.

The recipe consults no classifier: neither the evaluation judge (hatesonar) nor a reward scorer
(profanity-check) decides which dialogue is kept. A dialogue passes on form alone: DialogSum turns,
lengths, a summary naming the speakers, a topic and wording not used before, and — heated or calm —
a fixed word list below (heated: at least two turns with a listed word; calm and every summary: none).

    python scripts/check_dialogues.py NEW.jsonl [--against src/detoxrl/assets/heated_dialogsum.jsonl ...]

Prints one line per failing row and exits 1 if any fails.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

# Offensive words the recipe asks heated dialogues to use (profanity and personal insults, no slurs).
OFFENSIVE = (
    "fuck", "fucking", "fucked", "fucker", "shit", "shitty", "bullshit", "asshole", "ass", "arse", "bitch", "bastard",
    "idiot", "idiots", "moron", "morons", "dumbass", "stupid", "dick", "dickhead", "prick", "crap", "damn", "hell",
    "jerk", "loser", "scumbag", "twat", "wanker", "piss", "pissed", "screw", "cow", "pig", "freak", "clown", "cretin",
    "imbecile", "dimwit", "numbskull", "douchebag", "douche", "retard",
)
OFFENSIVE_RE = re.compile(r"\b(" + "|".join(OFFENSIVE) + r")\b", re.IGNORECASE)
SLURS_RE = re.compile(r"\b(retard)\w*\b", re.IGNORECASE)  # listed above only to be refused
TURN = re.compile(r"^#Person[123]#: \S")
FIELDS = ["id", "dialogue", "summary", "topic", "heated"]


def trigrams(text: str) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + 3]) for i in range(len(words) - 2)}


def row_problems(row: dict, seen_topics: set[str], seen_trigrams: list[set]) -> list[str]:
    problems = []
    if list(row) != FIELDS:
        return [f"fields must be {FIELDS} in this order, got {list(row)}"]
    dialogue, summary = row["dialogue"], row["summary"]
    turns = dialogue.split("\n")
    if not 6 <= len(turns) <= 9:
        problems.append(f"{len(turns)} turns (6-9)")
    if not all(TURN.match(t) for t in turns):
        problems.append("a turn does not start with '#PersonN#: '")
    if not 330 <= len(dialogue) <= 587:
        problems.append(f"dialogue of {len(dialogue)} characters (330-587)")
    if not 98 <= len(summary) <= 193:
        problems.append(f"summary of {len(summary)} characters (98-193)")
    if "#Person1#" not in summary and "#Person2#" not in summary:
        problems.append("summary names neither #Person1# nor #Person2#")
    if OFFENSIVE_RE.search(summary):
        problems.append(f"summary uses {OFFENSIVE_RE.search(summary).group(0)!r}")
    if SLURS_RE.search(dialogue):
        problems.append("uses a slur")
    if not isinstance(row["heated"], bool):
        problems.append("heated must be true or false")
    offensive_turns = sum(bool(OFFENSIVE_RE.search(t.split(": ", 1)[-1])) for t in turns)
    if row["heated"] is True and offensive_turns < 2:
        problems.append(f"heated, but only {offensive_turns} turn(s) use a listed word (2 or more)")
    if row["heated"] is False and offensive_turns:
        problems.append(f"calm, but {offensive_turns} turn(s) use a listed word")
    topic = row["topic"].strip().lower()
    if not topic or topic in seen_topics:
        problems.append(f"topic {row['topic']!r} empty or used before")
    mine = trigrams(dialogue)
    worst = max((len(mine & other) / len(mine | other) for other in seen_trigrams), default=0.0)
    if worst > 0.08:
        problems.append(f"word-trigram Jaccard {worst:.3f} to an earlier dialogue (at most 0.08)")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("new")
    parser.add_argument("--against", nargs="*", default=["src/detoxrl/assets/heated_dialogsum.jsonl"])
    args = parser.parse_args()
    seen_topics: set[str] = set()
    seen_trigrams: list[set] = []
    for path in args.against:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                seen_topics.add(row["topic"].strip().lower())
                seen_trigrams.append(trigrams(row["dialogue"]))
    failed = 0
    rows = [json.loads(line) for line in Path(args.new).read_text(encoding="utf-8").splitlines() if line.strip()]
    for row in rows:
        problems = row_problems(row, seen_topics, seen_trigrams)
        if problems:
            failed += 1
            print(f"{row.get('id')}: " + "; ".join(problems))
        seen_topics.add(str(row.get("topic", "")).strip().lower())
        seen_trigrams.append(trigrams(str(row.get("dialogue", ""))))
    print(f"{len(rows) - failed} of {len(rows)} rows pass")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
