"""The feature bank (services/paired/features.py): every feature moves the way its words say."""

from __future__ import annotations

import numpy as np
import pytest

from services.paired.features import FEATURES, FEATURES_BY_NAME, FeatureCache, feature, feature_matrix

# (feature, an answer that shows more of it, one that shows less, prompt)
CASES = [
    ("words", "One two three four five six.", "One two.", ""),
    ("sentences", "One. Two. Three.", "One two three.", ""),
    ("words_per_sentence", "This sentence has quite a few words in it.", "Short. Very. Tiny.", ""),
    ("letters_per_word", "Extraordinary circumstances necessitate deliberation.", "I am so sad it is.", ""),
    ("lines", "First line.\nSecond line.\nThird.", "All on one line.", ""),
    ("markdown", "Some **bold** claim.", "No formatting here.", ""),
    ("bold", "A **very** important **point**.", "A very important point.", ""),
    ("bullets", "Steps:\n- one\n- two\n- three", "Steps: one, two, three.", ""),
    ("numbered_items", "Steps:\n1. one\n2. two", "Steps one and two.", ""),
    ("code", "Run `pip install x` first.", "Run pip first.", ""),
    ("exclamations", "Wow! Great! Yes!", "Fine. Good. Yes.", ""),
    ("ends_with_exclamation", "That is all!", "That is all.", ""),
    ("questions", "Why? How? When?", "Because. Like so. Now.", ""),
    ("ends_with_question", "Does that help?", "That should help.", ""),
    ("enthusiastic_opener", "Great question! Here it is.", "Here it is. Great.", ""),
    ("yes_no_opener", "No, that is wrong.", "That is wrong, no.", ""),
    ("first_person_singular", "I think my view is mine.", "The view is theirs.", ""),
    ("first_person_plural", "We think our plan works for us.", "The plan works.", ""),
    ("second_person", "You should check your settings.", "One should check the settings.", ""),
    ("contractions", "I don't think it's what you're after.", "I do not think it is what is needed.", ""),
    ("hedges", "It may possibly work, generally.", "It works.", ""),
    ("boosters", "It definitely always works, clearly.", "It works.", ""),
    ("apology", "Sorry, I missed that.", "I missed that.", ""),
    ("refusal", "As an AI, I cannot help with that.", "Here is how to do that.", ""),
    ("disclaimer", "Please consult a licensed professional before acting.", "Act at once.", ""),
    ("stresses_importance", "It is important to note the risks.", "Note the risks.", ""),
    ("summary_phrase", "Overall, it works.", "It works.", ""),
    ("numbers", "It costs 25 dollars and 3.5 hours.", "It costs little.", ""),
    ("link", "See https://example.org for more.", "See the docs for more.", ""),
    ("emoji", "Nice work \U0001f600", "Nice work", ""),
    ("formal_connectors", "However, it fails; therefore, we stop.", "It fails so we stop.", ""),
    ("colloquial_words", "Yeah it's gonna be cool lol.", "It will be fine.", ""),
    ("ellipses", "Well... maybe...", "Well, maybe.", ""),
    ("all_caps_words", "This is VERY IMPORTANT.", "This is very important.", ""),
    ("lowercase_i", "i think so", "I think so", ""),
    ("lowercase_sentence_starts", "this is it. and that too.", "This is it. And that too.", ""),
    ("parentheses", "It works (mostly) well (usually).", "It works well.", ""),
    ("quotation_marks", 'He said "yes" and "no".', "He said yes and no.", ""),
    ("colons", "Two options: this or that: pick.", "Two options, this or that.", ""),
    ("semicolons", "It works; it is fast; it is cheap.", "It works and it is fast.", ""),
    ("glued_sentences", "It works.Then it stops.Again.", "It works. Then it stops. Again.", ""),
    ("space_before_punctuation", "It works . It stops , again .", "It works. It stops, again.", ""),
    ("curly_quotes", "He said \u2018yes\u2019 and \u201cno\u201d.", "He said 'yes' and no.", ""),
    ("restates_question", "Tomatoes crack because watering varies a lot.", "It is about water.",
     "Why do tomatoes crack after watering?"),
    ("copies_prompt", "The council approved the new budget on Monday.", "Officials agreed spending plans.",
     "The council approved the new budget on Monday after a long debate."),
]


def test_every_feature_has_a_case() -> None:
    assert {c[0] for c in CASES} == set(FEATURES_BY_NAME)


@pytest.mark.parametrize(("name", "more", "less", "prompt"), CASES, ids=[c[0] for c in CASES])
def test_feature_moves_as_its_words_say(name: str, more: str, less: str, prompt: str) -> None:
    f = feature(name)
    assert f(more, prompt) > f(less, prompt)
    if f.binary:
        assert (f(more, prompt), f(less, prompt)) == (1.0, 0.0)
    assert f.more != f.less and f.more and f.less


def test_rates_do_not_grow_with_length_alone() -> None:
    hedged = "It may work. "
    assert feature("hedges")(hedged * 10) == pytest.approx(feature("hedges")(hedged))
    assert feature("words")(hedged * 10) > feature("words")(hedged)


def test_empty_text_scores_zero_everywhere() -> None:
    assert not np.any(feature_matrix([""], [""]))


def test_unknown_feature_names_the_known_ones() -> None:
    with pytest.raises(KeyError, match="known"):
        feature("sparkle")


def test_cache_matches_direct_computation_and_computes_once() -> None:
    texts, prompts = ["Hi! You there?", "I think so.", "Hi! You there?"], ["q", "q", "q"]
    cache = FeatureCache()
    m = cache.matrix(texts, prompts)
    assert np.array_equal(m, feature_matrix(texts, prompts))
    assert len(cache) == 2
    cache.matrix(texts[:1], prompts[:1])
    assert len(cache) == 2
    j = cache.index["exclamations"]
    assert np.array_equal(cache.column("exclamations", texts, prompts), m[:, j])
    assert len(FEATURES) == len(cache.features)
