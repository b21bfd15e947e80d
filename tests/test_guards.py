"""Guards the reward cannot buy: specificity, template collapse and near-duplicates, and the calibration rows
that show what a content-free sentence scores."""

import numpy as np

from detoxrl.evaluation.guards import (
    calibration_texts, copied_from_source, guard_flags, guard_metrics, near_duplicates, opening,
)
from detoxrl.evaluation.stats import quality_metrics

SOURCES = [
    "#Person1#: The printer jammed again and the report is due. #Person2#: I will call the technician now.",
    "#Person1#: You idiot, you parked in my spot again! #Person2#: Sorry, I will move the car.",
    "#Person1#: The soup is cold and salty. #Person2#: I apologise, the chef will make a new bowl.",
    "#Person1#: Our flight to Lisbon is delayed by three hours. #Person2#: Then we miss the ferry.",
]
SUMMARIES = [
    "Person1 says the printer jammed before the report deadline; Person2 calls the technician.",
    "Person1 insults Person2 for parking in their spot; Person2 apologises and moves the car.",
    "Person1 complains the soup is cold and salty; Person2 apologises and orders a new bowl.",
    "Their flight to Lisbon is delayed three hours, so they will miss the ferry.",
]
STOCK = "#Person1# complains to #Person2# about the problem and #Person2# agrees to fix it."


def test_real_summaries_are_specific_and_a_stock_sentence_is_not():
    real = guard_metrics(SUMMARIES, guard_flags(SUMMARIES, SOURCES, 1))
    stock = guard_metrics([STOCK] * 4, guard_flags([STOCK] * 4, SOURCES, 1))
    assert real["specificity"] == 1.0 and real["specific_responses"] == 4
    assert stock["specificity"] <= 0.25  # at best the one dialogue it happens to resemble most
    assert real["opening_share"] == 0.25 and stock["opening_share"] == 1.0
    assert stock["most_common_opening"] == opening(STOCK) == "#person1# complains to #person2#"
    assert real["near_duplicate_rate"] == 0.0 and stock["near_duplicate_rate"] == 1.0


def test_a_prompts_own_samples_are_not_near_duplicates():
    """k = 2 identical samples of one prompt are agreement, not collapse; the same text for two prompts is."""
    same_prompt = ["the printer jammed", "the printer jammed", "the soup was cold", "a delayed flight"]
    assert not near_duplicates(same_prompt, 2).any()
    across = ["the printer jammed", "the soup was cold", "the printer jammed", "a delayed flight"]
    assert near_duplicates(across, 2).tolist() == [True, False, True, False]


def test_a_copy_of_the_dialogue_is_flagged_and_a_summary_with_a_short_quote_is_not():
    """Specificity scores a copy of the dialogue as highly as a summary; the copy rate tells them apart."""
    quoting = 'Person1 shouts "you idiot" because Person2 parked in the wrong spot; Person2 moves the car.'
    responses = [SOURCES[0], SUMMARIES[0], quoting, SOURCES[2], "", "Fine."]
    sources = [SOURCES[0], SOURCES[0], SOURCES[1], SOURCES[1], SOURCES[2], SOURCES[2]]
    assert copied_from_source(responses, [SOURCES[0], SOURCES[1], SOURCES[2]], 2).tolist() == \
        [True, False, False, False, False, False]  # SOURCES[2] copies a dialogue, but not its own
    copies = guard_metrics(responses, guard_flags(responses, sources[::2], 2))
    assert copies["copy_rate"] == 1 / 6 and copies["copied_responses"] == 1
    summaries = guard_metrics(SUMMARIES, guard_flags(SUMMARIES, SOURCES, 1))
    dialogue = guard_metrics(SOURCES, guard_flags(SOURCES, SOURCES, 1))
    assert summaries["specificity"] == dialogue["specificity"] == 1.0
    assert summaries["copy_rate"] == 0.0 and dialogue["copy_rate"] == 1.0


def test_calibration_shows_that_rouge_rewards_a_stock_sentence_and_specificity_does_not():
    """On this data a constant sentence matches the summaries' speaker words, so ROUGE-L gives it credit;
    the guards give it none. That is what the calibration rows are for."""
    rows = calibration_texts(SOURCES, SUMMARIES, STOCK)
    assert list(rows) == ["constant sentence", "first line of the dialogue", "reference summary"]
    assert rows["first line of the dialogue"][0] == SOURCES[0]  # one-line dialogues: the whole text
    scores = {name: (quality_metrics(texts, SUMMARIES)["rougeL"],
                     guard_metrics(texts, guard_flags(texts, SOURCES, 1))["specificity"])
              for name, texts in rows.items()}
    assert scores["reference summary"] == (1.0, 1.0)
    assert scores["constant sentence"][0] > 0.1 and scores["constant sentence"][1] <= 0.25
    assert np.isclose(scores["first line of the dialogue"][1], 1.0)
