"""Scorers (the classifier reward by label name, the built-in offline scorers, user callables) and the composite
reward of weighted terms, TRL-style reward functions among them."""

import locale
import math
import re
import sys
import uuid

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from detoxrl.config import RewardConfig, build_config, parse_reward_term
from detoxrl.errors import DetoxError
from detoxrl.rewards import (
    CallableScorer,
    ClassifierScorer,
    HateSonarScorer,
    ProfanityScorer,
    Scorer,
    build_evaluator,
    build_scorer,
    label_index,
    log_odds,
    reward_from_logits,
    reward_from_probability,
)
from detoxrl.rewards.composite import Reward, sentences
from detoxrl.rewards.fidelity import rouge_l
from detoxrl.rewards.novelty import bigram_novelty
from tiny import save_tiny_classifier

# Words from the tiny tokenizer's vocabulary, of different lengths so batches are padded.
TEXTS = ["you stupid idiot", "thanks nice meeting about the price of a car", "damn", "good talk"]
INSULT = "You are a stupid idiot, shut the hell up"
NEUTRAL = "Thanks, the meeting is moved to Tuesday."


@pytest.fixture(scope="module")
def clf_path(tmp_path_factory):
    return str(save_tiny_classifier(tmp_path_factory.mktemp("clf")))


def reference_logits(path, texts):
    """The classifier's logits, one unpadded text at a time, without the scorer."""
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        return torch.cat([model(**tok([t], return_tensors="pt")).logits for t in texts])


# ---------------------------------------------------------------- classifier scorer


def test_classifier_logit_prob_and_log_odds_rewards(clf_path):
    ref = reference_logits(clf_path, TEXTS).double()
    assert not torch.allclose(ref[:, 0], ref[:, 1])  # a random model: the two classes differ
    p = [math.exp(a) / (math.exp(a) + math.exp(b)) for a, b in ref.tolist()]

    # batch_size 3 over 4 texts: two chunks, with padding inside each
    logit = ClassifierScorer(clf_path, label="nothate", transform="logit", batch_size=3)
    np.testing.assert_allclose(logit.rewards(TEXTS), ref[:, 0].numpy(), atol=1e-5)

    prob = ClassifierScorer(clf_path, label="nothate", transform="prob", batch_size=3)
    np.testing.assert_allclose(prob.rewards(TEXTS), p, atol=1e-5)

    lo = ClassifierScorer(clf_path, label="nothate", transform="log_odds", batch_size=3)
    np.testing.assert_allclose(lo.rewards(TEXTS), [math.log(q / (1 - q)) for q in p], atol=1e-5)

    np.testing.assert_allclose(logit.toxicity(TEXTS), [1 - q for q in p], atol=1e-5)
    assert logit.rewards(TEXTS).dtype == np.float32


def test_classifier_rewarding_the_other_label(clf_path):
    ref = reference_logits(clf_path, TEXTS[:2])
    hate = ClassifierScorer(clf_path, label="hate", transform="logit")
    np.testing.assert_allclose(hate.rewards(TEXTS[:2]), ref[:, 1].numpy(), atol=1e-5)
    p_hate = [math.exp(b) / (math.exp(a) + math.exp(b)) for a, b in ref.double().tolist()]
    hate_prob = ClassifierScorer(clf_path, label="hate", transform="prob")
    np.testing.assert_allclose(hate_prob.rewards(TEXTS[:2]), p_hate, atol=1e-5)
    np.testing.assert_allclose(hate_prob.toxicity(TEXTS[:2]), [1 - q for q in p_hate], atol=1e-5)


def test_classifier_empty_batch(clf_path):
    scorer = ClassifierScorer(clf_path, label="nothate")
    assert scorer.rewards([]).shape == (0,)
    assert scorer.toxicity([]).shape == (0,)


def test_label_lookup_is_by_name_and_case_insensitive(clf_path):
    assert ClassifierScorer(clf_path, label="NotHate").index == 0
    assert ClassifierScorer(clf_path, label="HATE").index == 1
    # by name, not by position: a model whose non-toxic class is second
    assert label_index({0: "toxic", 1: "Neutral"}, "neutral") == 1
    assert label_index({0: "LABEL_0", 1: "LABEL_1"}, "label_1") == 1


def test_missing_label_lists_the_model_labels(clf_path):
    with pytest.raises(DetoxError, match=r"'neutral'.*nothate, hate"):
        ClassifierScorer(clf_path, label="neutral")
    with pytest.raises(DetoxError, match=r"toxic, non-toxic"):
        label_index({0: "toxic", 1: "non-toxic"}, "nothate")


def test_reward_from_logits_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    close = lambda a, b: np.testing.assert_allclose(a.numpy(), b, atol=1e-6)  # noqa: E731
    close(reward_from_logits(logits, 0, "logit"), [2.0, 0.0])
    z = [math.exp(2) + 1 + math.exp(-1), 3.0]
    close(reward_from_logits(logits, 0, "prob"), [math.exp(2) / z[0], 1 / 3])
    close(reward_from_logits(logits, 2, "prob"), [math.exp(-1) / z[0], 1 / 3])
    # log(p / (1 - p)) with p the class-0 probability
    p = [math.exp(2) / z[0], 1 / 3]
    close(reward_from_logits(logits, 0, "log_odds"), [math.log(q / (1 - q)) for q in p])
    close(reward_from_logits(logits, 2, "log_odds"), [-1 - math.log(math.exp(2) + 1), math.log(0.5)])
    close(reward_from_logits(logits, 0, "log_prob"), [2 - math.log(z[0]), math.log(1 / 3)])


def test_recipe_index0_bug_regression(clf_path):
    """The recipe rewarded the top class's logit; when 'hate' wins that is the hate logit."""
    scorer = ClassifierScorer(clf_path, label="nothate", transform="logit")
    with torch.no_grad():
        scorer.model.classifier.out_proj.bias.copy_(torch.tensor([-5.0, 5.0]))
    logits = scorer.logits(TEXTS)
    assert (logits[:, 1] > logits[:, 0]).all()  # 'hate' wins every text

    recipe = logits.max(dim=1).values  # pipeline output sorted by score, element [0]
    index = label_index(scorer.model.config.id2label, "nothate")
    fixed = reward_from_logits(logits, index, "logit")

    assert index == 0
    assert torch.equal(fixed, logits[:, 0])
    assert torch.equal(recipe, logits[:, 1])
    assert (fixed < recipe - 5).all()  # the recipe paid a high reward for hateful text
    np.testing.assert_allclose(scorer.rewards(TEXTS), logits[:, 0].numpy(), atol=1e-6)


# ---------------------------------------------------------------- built-in scorers


@pytest.fixture(scope="module")
def hatesonar():
    return HateSonarScorer()


@pytest.fixture(scope="module")
def profanity():
    return ProfanityScorer()


@pytest.fixture(params=["hatesonar", "profanity"])
def builtin(request):
    return request.getfixturevalue(request.param)


def test_builtin_insult_is_more_toxic_than_neutral(builtin):
    tox = builtin.toxicity([INSULT, NEUTRAL])
    rew = builtin.rewards([INSULT, NEUTRAL])
    assert tox.shape == rew.shape == (2,)
    assert ((tox >= 0) & (tox <= 1)).all()
    assert tox[0] > tox[1] + 0.3
    assert rew[0] < rew[1]
    assert rew[0] < 0 < rew[1]  # non-toxic probability below / above one half


def test_builtin_rewards_are_log_odds_of_nontoxic(builtin):
    texts = [INSULT, NEUTRAL, "the price of the car is good"]
    p = 1.0 - builtin.toxicity(texts).astype(np.float64)
    p = np.clip(p, 1e-6, 1 - 1e-6)  # a certain classifier gives a large but finite reward
    np.testing.assert_allclose(builtin.rewards(texts), np.log(p / (1 - p)), rtol=1e-3, atol=1e-3)
    assert np.isfinite(builtin.rewards(texts)).all()


@pytest.mark.parametrize("transform", ["log_prob", "prob", "logit"])
def test_builtin_rewards_follow_the_transform(builtin, transform):
    texts = [INSULT, NEUTRAL, "the price of the car is good"]
    p = 1.0 - builtin.toxicity(texts).astype(np.float64)
    builtin.transform = transform
    try:
        rewards = builtin.rewards(texts)
    finally:
        builtin.transform = "log_odds"
    expected = {"log_prob": np.log(np.clip(p, 1e-6, 1)), "prob": p, "logit": log_odds(p)}[transform]
    np.testing.assert_allclose(rewards, expected, rtol=1e-3, atol=1e-3)
    if transform == "log_prob":  # clean text earns ~0 and no more; toxic text keeps its penalty
        assert rewards[1] <= 0 and rewards[1] > -0.7 and rewards[0] < rewards[1] - 0.3


def test_reward_from_probability_by_hand():
    p = np.array([0.5, 0.9, 0.0])
    np.testing.assert_allclose(reward_from_probability(p, "log_prob"), [math.log(0.5), math.log(0.9), math.log(1e-6)],
                               rtol=1e-6)
    np.testing.assert_allclose(reward_from_probability(p, "log_odds"), log_odds(p))
    np.testing.assert_allclose(reward_from_probability(p, "prob"), p)


def test_builtin_empty_batch(builtin):
    assert builtin.rewards([]).shape == (0,)
    assert builtin.toxicity([]).shape == (0,)


def test_log_odds_by_hand():
    out = log_odds(np.array([0.5, 0.75, 0.2, 0.0, 1.0]))
    eps = 1e-6
    expected = [0.0, math.log(3), math.log(0.25), math.log(eps / (1 - eps)), math.log((1 - eps) / eps)]
    np.testing.assert_allclose(out, expected, rtol=1e-5)
    assert out.dtype == np.float32


def _locale_installed(name):
    current = locale.setlocale(locale.LC_ALL)
    try:
        locale.setlocale(locale.LC_ALL, name)
        return True
    except locale.Error:
        return False
    finally:
        locale.setlocale(locale.LC_ALL, current)


def test_hatesonar_needs_no_en_us_locale(hatesonar):
    assert hatesonar.toxicity(["hello there"]).shape == (1,)
    if _locale_installed("en_US.UTF-8"):
        pytest.skip("en_US.UTF-8 is installed here, so the stock graph would load too")
    # the packaged graph, as shipped, cannot even be loaded without the locale
    import onnxruntime as ort
    from hatesonar.api import DEFAULT_MODEL_FILE

    with pytest.raises(Exception, match="locale"):
        ort.InferenceSession(str(DEFAULT_MODEL_FILE), providers=["CPUExecutionProvider"])


def test_hatesonar_lowercases_text(hatesonar):
    np.testing.assert_allclose(hatesonar.toxicity([INSULT.upper()]), hatesonar.toxicity([INSULT.lower()]), atol=1e-6)


# ---------------------------------------------------------------- user callables

MODULE_SOURCE = """
def score(texts):
    return [float(len(t)) for t in texts]

def short(texts):
    return [1.0]

def matrix(texts):
    return [[1.0, 2.0]] * len(texts)

NOT_A_FUNCTION = 3
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A fresh module in tmp_path, importable only because it is the working directory."""
    name = f"user_reward_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(MODULE_SOURCE)
    (tmp_path / f"{name}_broken.py").write_text("import detoxrl_no_such_dependency\n")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    monkeypatch.chdir(tmp_path)
    yield name
    for mod in (name, f"{name}_broken"):
        sys.modules.pop(mod, None)


def test_callable_scorer_from_working_directory(user_module):
    scorer = CallableScorer(f"{user_module}:score")
    out = scorer.rewards(["ab", "abcde", ""])
    np.testing.assert_array_equal(out, [2.0, 5.0, 0.0])
    assert out.dtype == np.float32
    assert scorer.name == f"{user_module}:score"


@pytest.mark.parametrize("spec", ["mymod", "mymod:", ":score", ""])
def test_callable_scorer_bad_spec(spec):
    with pytest.raises(DetoxError, match="module:function"):
        CallableScorer(spec)


def test_callable_scorer_missing_module(user_module):
    with pytest.raises(DetoxError, match="cannot import reward module 'detoxrl_missing_mod_xyz'"):
        CallableScorer("detoxrl_missing_mod_xyz:score")
    # an import error inside the user's module names the missing dependency
    with pytest.raises(DetoxError, match="detoxrl_no_such_dependency"):
        CallableScorer(f"{user_module}_broken:score")


def test_callable_scorer_missing_function(user_module):
    with pytest.raises(DetoxError, match=f"module '{user_module}' has no function 'nope'"):
        CallableScorer(f"{user_module}:nope")
    with pytest.raises(DetoxError, match="has no function 'NOT_A_FUNCTION'"):
        CallableScorer(f"{user_module}:NOT_A_FUNCTION")


def test_callable_scorer_wrong_output_length(user_module):
    with pytest.raises(DetoxError, match="returned 1 values for 2 texts"):
        CallableScorer(f"{user_module}:short").rewards(["a", "b"])
    with pytest.raises(DetoxError, match="returned 6 values for 3 texts"):
        CallableScorer(f"{user_module}:matrix").rewards(["a", "b", "c"])
    # the length check is against the batch: one text, one value is fine
    np.testing.assert_array_equal(CallableScorer(f"{user_module}:short").rewards(["x"]), [1.0])


# ---------------------------------------------------------------- rollout.score


class FixedScorer(Scorer):
    name = "fixed"

    def __init__(self, values):
        self.values, self.seen = values, None

    def rewards(self, texts):
        self.seen = list(texts)
        return np.array(self.values[: len(texts)])


def reward_of(scorer, **settings) -> Reward:
    return Reward.from_config(scorer, RewardConfig(**settings))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_reward_rejects_non_finite_values(bad):
    with pytest.raises(DetoxError, match=r"NaN or infinite for 1 of 3 texts \(scorer fixed\)"):
        reward_of(FixedScorer([0.5, bad, 1.0]))(["q1", "q2", "q3"], ["r1", "r2", "r3"])


def test_reward_scores_the_response_or_query_and_response():
    scorer = FixedScorer([0.5, -1.0])
    values, terms = reward_of(scorer)(["q1", "q2"], ["r1", "r2"])
    assert values.dtype == np.float32 and values.tolist() == [0.5, -1.0] and list(terms) == ["scorer"]
    assert scorer.seen == ["r1", "r2"]
    reward_of(scorer, score_query=True)(["q1", "q2"], ["r1", "r2"])
    assert scorer.seen == ["q1 r1", "q2 r2"]


def test_sentences_split_after_stops_closing_quotes_and_line_breaks():
    assert sentences('It broke. "You idiot!" he said.  Then\nshe left') == \
        ["It broke.", '"You idiot!"', "he said.", "Then", "she left"]
    assert sentences("") == [""] and sentences("no stop") == ["no stop"]


def test_reward_of_sentences_is_the_least_clean_sentence_whatever_surrounds_it():
    scorer = FixedScorer([1.0, -5.0, 2.0, 3.0, 0.5])
    reward = reward_of(scorer, score_sentences=True)
    values, _ = reward(["q1", "q2", "q3"], ["Fine. You idiot.", "All good.", ""])
    assert scorer.seen == ["Fine.", "You idiot.", "All good.", ""]
    assert values.tolist() == [-5.0, 2.0, 3.0]
    assert "least clean sentence" in reward.describe()


def test_sentence_scoring_removes_what_padding_buys_under_a_whole_text_classifier(profanity):
    insult = '"You fucking idiot," Person1 said.'
    padding = "Person1 asks Person2 to fix the washing machine in the shared flat before the weekend. "
    whole, by_sentence = reward_of(profanity), reward_of(profanity, score_sentences=True)
    short, padded = [insult], [padding * 3 + insult]
    assert whole(["q"], padded)[0][0] > whole(["q"], short)[0][0] + 5  # padding buys nats under whole-text scoring
    assert by_sentence(["q"], padded)[0][0] == pytest.approx(by_sentence(["q"], short)[0][0])


def test_score_sentences_and_score_query_cannot_be_combined():
    with pytest.raises(DetoxError, match="reward.score_sentences .* cannot be combined with reward.score_query"):
        build_config("smollm2-offline", overrides={"reward.score_sentences": True, "reward.score_query": True}).validate()


def test_novelty_can_refuse_to_pay_for_bigrams_copied_from_the_prompt():
    prompts = ["Dialogue: you stupid idiot, fix the sink", "Dialogue: the train is late again"]
    copy, summary = "you stupid idiot, fix the sink", "a plumber is called about a leak"
    assert bigram_novelty([copy, summary], prompts).tolist() == [1.0, 1.0]
    assert bigram_novelty([copy, summary], prompts, exclude_prompt=True).tolist() == [0.0, 1.0]
    reward = reward_of(FixedScorer([0.0, 0.0]), novelty_weight=1.0, novelty_excludes_prompt=True)
    assert reward(prompts, [copy, summary])[1]["novelty"].tolist() == [0.0, 1.0]
    assert reward.describe().endswith("bigram novelty (bigrams copied from the prompt excluded)")


def test_reward_adds_weighted_novelty_within_the_whole_batch():
    reward = reward_of(FixedScorer([0.5, -1.0]), novelty_weight=2.0)
    batch = {"prompts": ["p0", "p1", "p2"], "completions": ["x y", "a b c", "a b"], "offset": 1}
    values, terms = reward(["p1", "p2"], ["a b c", "a b"], batch=batch)
    assert terms["novelty"].tolist() == [0.5, 0.0]  # "a b" is used by the other prompt's completion
    assert values.tolist() == [0.5 + 2 * 0.5, -1.0 + 2 * 0.0]
    assert reward.describe().endswith(" + 2 x bigram novelty")


def trl_brevity(prompts, completions, **kwargs):
    """A reward function as written for TRL: shorter completions score higher."""
    return [-float(len(c.split())) for c in completions]


def test_trl_style_functions_are_terms_with_their_name_and_weight(monkeypatch, tmp_path):
    (tmp_path / "myrewards.py").write_text("def brevity(prompts, completions, **kwargs):\n"
                                           "    return [-float(len(c.split())) for c in completions]\n")
    monkeypatch.chdir(tmp_path)
    reward = reward_of(FixedScorer([0.5, 0.5]), terms=["myrewards:brevity=0.25"])
    values, terms = reward(["p", "q"], ["a b c", "d"])
    assert reward.weights() == {"scorer": 1.0, "myrewards:brevity": 0.25}
    assert values.tolist() == [0.5 - 0.25 * 3, 0.5 - 0.25 * 1]
    assert "0.25 x `myrewards:brevity`" in reward.describe()
    added = reward_of(FixedScorer([0.5, 0.5])).with_term(trl_brevity, 0.5)
    assert added.weights() == {"scorer": 1.0, "trl_brevity": 0.5}
    assert added(["p", "q"], ["a b", "c"])[0].tolist() == [0.5 - 1.0, 0.5 - 0.5]


@pytest.mark.parametrize("body, message", [
    ("return [1.0]", "reward term 'f' returned 1 values for 2 completions"),
    ("return ['good', 'bad']", "reward term 'f' must return one number per completion, got ['good', 'bad']"),
    ("return [1.0, float('nan')]", "the reward is NaN or infinite for 1 of 2 texts (term f)"),
])
def test_a_term_that_returns_the_wrong_thing_is_named(body, message):
    namespace = {}
    exec(f"def f(prompts, completions, **kwargs):\n    {body}\n", namespace)
    reward = reward_of(FixedScorer([0.5, 0.5])).with_term(namespace["f"])
    with pytest.raises(DetoxError, match=re.escape(message)):
        reward(["p", "q"], ["a", "b"])


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), "heavy", True])
def test_a_term_weight_must_be_a_finite_number(weight):
    with pytest.raises(DetoxError, match="the weight of reward term 'trl_brevity' must be a finite number"):
        reward_of(FixedScorer([0.5])).with_term(trl_brevity, weight)


@pytest.mark.parametrize("spec", ["myrewards:brevity=inf", "myrewards:brevity=nan", "myrewards:brevity=x", "brevity"])
def test_reward_terms_setting_is_checked(spec):
    with pytest.raises(DetoxError, match="reward.terms entries look like module:function or module:function=WEIGHT"):
        parse_reward_term(spec)


def test_fidelity_and_novelty_weights_must_be_finite():
    for name in ("fidelity_weight", "novelty_weight"):
        with pytest.raises(DetoxError, match=f"reward.{name} must be 0 or more \\(a finite number\\), got inf"):
            build_config("smollm2-offline", overrides={f"reward.{name}": float("inf")}).validate()


# ---------------------------------------------------------------- fidelity

SUMMARIES = ["#Person1# complains to #Person2# that the kitchen cabinets came two months late.",
             "#Person2# tells #Person1# that white trainers break the office dress code."]
STOCK = "#Person1# complains to #Person2# about the problem and #Person2# agrees to fix it."


def test_content_word_fidelity_does_not_pay_for_the_references_template():
    stock = [STOCK] * 2
    facts = ["The cabinets arrived two months late.", "White trainers broke the dress code."]
    # Over all words the stock sentence shares the summaries' "#Person1# complains to #Person2#" and scores
    # 0.40 on the first, about as much as its facts (0.56); over content words only "complains" is left.
    assert rouge_l(stock, SUMMARIES).max() > 0.35
    assert rouge_l(stock, SUMMARIES, content_words=True).max() < 0.25
    assert rouge_l(facts, SUMMARIES, content_words=True).min() > 0.55
    # speaker tags and stop words alone: nothing in common; stemming still applies
    assert rouge_l(["#Person1# and the"], ["#Person2# is the"], content_words=True).tolist() == [0.0]
    assert rouge_l(["cabinet arrives"], ["cabinets arrived"], content_words=True).tolist() == [1.0]


def test_reward_config_chooses_the_fidelity_words():
    plain = RewardConfig(scorer="profanity-check", fidelity_weight=2.0)
    content = RewardConfig(scorer="profanity-check", fidelity_weight=2.0, fidelity_content_words=True)
    scorer = FixedScorer([0.0, 0.0])
    for config, words in ((plain, False), (content, True)):
        reward = Reward.from_config(scorer, config, reference_name="summary")
        _, values = reward([STOCK, STOCK], [STOCK, STOCK], references=SUMMARIES)
        assert values["fidelity"].tolist() == rouge_l([STOCK, STOCK], SUMMARIES, content_words=words).tolist()
        assert ("ROUGE-L over content words against" in reward.describe()) is words


# ---------------------------------------------------------------- novelty


def test_bigram_novelty_by_hand():
    responses = ["Thanks a lot", "thanks, a bunch of cars", "a bunch", "", "hello"]
    prompts = ["p", "q", "q", "r", "s"]
    # "thanks a lot": "thanks a" is used by prompt q's responses, "a lot" by no other prompt -> 1/2.
    # Prompt q's own two responses share "a bunch": not counted against them. "thanks a" is p's too -> 3/4.
    # No bigram (empty, one word) -> 0.
    assert bigram_novelty(responses, prompts).tolist() == [0.5, 0.75, 1.0, 0.0, 0.0]


def test_bigram_novelty_of_one_stock_phrasing_is_low():
    stock = "In this conversation, they highlighted the importance of {}."
    own = ["the kitchen cabinets came two months late", "white trainers broke the dress code"]
    assert bigram_novelty([stock.format("cabinets"), stock.format("trainers")], ["a", "b"]).max() < 0.2
    assert bigram_novelty(own, ["a", "b"]).min() == 1.0
    with pytest.raises(ValueError, match="2 responses but 1 prompts"):
        bigram_novelty(own, ["a"])


# ---------------------------------------------------------------- factories


def test_build_scorer_picks_the_scorer(clf_path, user_module):
    assert type(build_scorer(RewardConfig(scorer="hatesonar"))) is HateSonarScorer
    assert type(build_scorer(RewardConfig(scorer="profanity-check"))) is ProfanityScorer
    assert build_scorer(RewardConfig(scorer="profanity-check", transform="log_prob")).transform == "log_prob"

    cal = build_scorer(RewardConfig(scorer="callable", function=f"{user_module}:score"))
    assert type(cal) is CallableScorer
    assert cal.rewards(["abc"]).tolist() == [3.0]

    clf = build_scorer(RewardConfig(scorer="classifier", model=clf_path, label="HATE", transform="prob", batch_size=2))
    assert type(clf) is ClassifierScorer
    assert (clf.index, clf.transform, clf.batch_size) == (1, "prob", 2)


def test_build_scorer_callable_without_function():
    with pytest.raises(DetoxError, match="module:function"):
        build_scorer(RewardConfig(scorer="callable"))


def test_build_evaluator(clf_path, hatesonar):
    assert type(build_evaluator("hatesonar")) is HateSonarScorer
    ev = build_evaluator(clf_path, nontoxic_label="nothate")
    assert type(ev) is ClassifierScorer
    assert (ev.index, ev.transform) == (0, "prob")
