"""A bank of interpretable text features: each a number per answer, with words for "more" and "less".

Regexes and string operations only: every feature is a count or a rate a reader can check by eye,
and a parser or tagger (spaCy, NLTK) would cost a model download and ~100x the time for the same
counts.  Lexical features are rates per 100 words, so a longer answer does not score higher on
every one of them; length has its own features.  Binary features (0/1) say whether an answer
shows something at all; findings on them quote two rates ("in 31% of pairs against 6%").

A few features read the prompt too (the answer's overlap with it): summaries and answers that
restate the question differ there, and the prompt is part of every pair.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from types import MappingProxyType

import numpy as np
from sklearn.feature_extraction.text import CountVectorizer

from services.hypothesizer.offline import TOKEN_PATTERN

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})
_WORD = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z]+)*")
_SENTENCE_END = re.compile(r"[.!?]+(?:\s+|(?=[A-Z])|$)")


def _words_re(words: Sequence[str]) -> re.Pattern[str]:
    """Whole words or phrases, case-insensitive."""
    alts = sorted((re.escape(w).replace(r"\ ", r"\s+") for w in words), key=len, reverse=True)
    return re.compile(r"(?<![\w'])(?:" + "|".join(alts) + r")(?![\w'])", re.IGNORECASE)


class TextView:
    """One answer with the derived forms features share (computed once per answer)."""

    def __init__(self, text: str, prompt: str = "") -> None:
        self.raw = text
        self.text = text.translate(_APOSTROPHES)
        self.prompt = prompt.translate(_APOSTROPHES)

    @cached_property
    def words(self) -> list[str]:
        return _WORD.findall(self.text)

    @cached_property
    def n_words(self) -> int:
        return len(self.words)

    @cached_property
    def sentences(self) -> list[str]:
        return [s for s in (p.strip() for p in _SENTENCE_END.split(self.text)) if s]

    @cached_property
    def stripped(self) -> str:
        return self.text.strip()

    def count(self, pattern: re.Pattern[str]) -> int:
        return sum(1 for _ in pattern.finditer(self.text))

    def per_100_words(self, pattern: re.Pattern[str]) -> float:
        return 100.0 * self.count(pattern) / self.n_words if self.n_words else 0.0

    def has(self, pattern: re.Pattern[str]) -> float:
        return 1.0 if pattern.search(self.text) else 0.0


@dataclass(frozen=True)
class Feature:
    """``more``/``less`` complete "the intervention's answers ..." when it scores higher/lower."""

    name: str
    fn: Callable[[TextView], float]
    more: str
    less: str
    unit: str = ""
    binary: bool = False

    def __call__(self, text: str, prompt: str = "") -> float:
        return float(self.fn(TextView(text, prompt)))


# --------------------------------------------------------------------------- patterns

BOLD = re.compile(r"\*\*[^*\n]+\*\*|__[^_\n]+__")
HEADER = re.compile(r"(?m)^\s{0,3}#{1,6}\s+\S")
BULLET = re.compile(r"(?m)^\s*[-*\u2022+]\s+\S")
NUMBERED = re.compile(r"(?m)^\s*\d{1,2}[.)]\s+\S")
CODE_BLOCK = re.compile(r"```")
INLINE_CODE = re.compile(r"(?<!`)`[^`\n]+`(?!`)")
EXCLAMATION = re.compile(r"!")
QUESTION = re.compile(r"\?")
FIRST_SINGULAR = _words_re(["i", "me", "my", "mine", "myself", "i'm", "i've", "i'd", "i'll"])
FIRST_PLURAL = _words_re(["we", "us", "our", "ours", "ourselves", "we're", "we've", "we'll", "we'd"])
SECOND_PERSON = _words_re(["you", "your", "yours", "yourself", "yourselves", "you're", "you've", "you'll",
                           "you'd"])
CONTRACTION = re.compile(r"(?i)\b[a-z]+(?:n't|'re|'m|'ve|'ll|'d)\b|\b(?:it|that|there|here|what|who|he|she|let|"
                         r"where|how)'s\b")
HEDGES = _words_re(["may", "might", "could", "possibly", "perhaps", "probably", "likely", "unlikely",
                    "generally", "typically", "usually", "often", "sometimes", "somewhat", "arguably",
                    "apparently", "seems", "seem", "suggests", "tend to", "tends to", "it depends",
                    "depending on", "in some cases", "to some extent", "it is possible", "it's possible",
                    "potentially"])
BOOSTERS = _words_re(["definitely", "certainly", "clearly", "obviously", "absolutely", "always", "never",
                      "surely", "undoubtedly", "totally", "completely", "literally"])
APOLOGY = _words_re(["sorry", "apologize", "apologise", "apologies", "i apologize", "my apologies"])
REFUSAL = re.compile(r"(?i)\b(?:as an ai|as a language model|i(?: am|'m) (?:not able|unable) to|"
                     r"i can(?:not|'t) (?:help|assist|provide|answer|browse|access|give)|"
                     r"i (?:don't|do not) have (?:access|the ability|personal|information|enough information))")
DISCLAIMER = re.compile(r"(?i)(?:not (?:a )?(?:substitute for )?(?:professional|legal|medical|financial|tax) advice|"
                        r"consult(?:ing)? (?:with )?(?:a|an|your) (?:[\w-]+ ){0,3}(?:professional|doctor|lawyer|"
                        r"attorney|advisor|adviser|physician|expert|specialist|accountant)|"
                        r"i(?: am|'m) not a (?:doctor|lawyer|financial advisor|professional))")
IMPORTANCE = re.compile(r"(?i)\bit(?:'s| is) (?:also )?(?:important|essential|crucial|worth noting|a good idea|"
                        r"always a good idea|recommended)\b")
SUMMARY = _words_re(["overall", "in summary", "in conclusion", "to summarize", "to sum up", "in short",
                     "ultimately"])
NUMBER = re.compile(r"(?<![\w.])\d+(?:[.,]\d+)*(?![\w])")
LINK = re.compile(r"(?i)https?://|www\.|\b[\w-]+\.(?:com|org|net|gov|edu|io)\b")
EMOJI = re.compile("[\U0001f300-\U0001faff\U00002600-\U000027bf\U0001f000-\U0001f2ff]")
CONNECTORS = _words_re(["however", "therefore", "additionally", "furthermore", "moreover", "thus",
                        "consequently", "hence", "nevertheless", "nonetheless", "in addition", "as a result",
                        "for example", "for instance", "in other words", "on the other hand", "overall"])
COLLOQUIAL = _words_re(["lol", "lmao", "haha", "yeah", "yep", "nope", "gonna", "wanna", "gotta", "kinda",
                        "sorta", "ok", "okay", "stuff", "dude", "guys", "tbh", "imo", "btw", "damn", "crap",
                        "shit", "fuck", "heck", "cool", "awesome", "pretty much", "anyway"])
ELLIPSIS = re.compile(r"\.\.\.|\u2026")
ALL_CAPS = re.compile(r"\b[A-Z]{2,}\b")
LOWERCASE_I = re.compile(r"(?<![\w'])i(?![\w])")
PARENTHESIS = re.compile(r"\(")
QUOTE = re.compile("[\"\u201c\u201d]")
COLON = re.compile(r":")
SEMICOLON = re.compile(r";")
GLUED = re.compile(r"[a-z)][.:!?][A-Z]")
SPACE_BEFORE_PUNCT = re.compile(r"\w\s+[.,;:!?](?=\s|$)")
CURLY_QUOTE = re.compile("[\u2018\u2019\u201c\u201d]")
ENTHUSIASTIC_OPENER = re.compile(r"(?i)^\W*(?:great|good|excellent|what a|oh|wow|sure|absolutely|of course|"
                                 r"certainly|love this|i love)\b")
YES_NO_OPENER = re.compile(r"(?i)^\W*(?:yes|no|yeah|yep|nope|nah)\b")
STOP = frozenset(["the", "a", "an", "and", "or", "of", "to", "in", "on", "for", "with", "is", "are", "was", "were",
                  "be", "it", "this", "that", "what", "why", "how", "do", "does", "can", "i", "you", "my", "your"])


# --------------------------------------------------------------------------- feature functions


def count_words(t: TextView) -> float:
    return float(t.n_words)


def count_sentences(t: TextView) -> float:
    return float(len(t.sentences))


def words_per_sentence(t: TextView) -> float:
    return t.n_words / len(t.sentences) if t.sentences else 0.0


def letters_per_word(t: TextView) -> float:
    return float(np.mean([len(w) for w in t.words])) if t.words else 0.0


def count_lines(t: TextView) -> float:
    return float(sum(1 for line in t.text.splitlines() if line.strip()))


def uses_markdown(t: TextView) -> float:
    return 1.0 if any(p.search(t.text) for p in (BOLD, HEADER, BULLET, NUMBERED, CODE_BLOCK, INLINE_CODE)) else 0.0


def ends_with(chars: str) -> Callable[[TextView], float]:
    def check(t: TextView) -> float:
        tail = t.stripped.rstrip("\"')\u201d\u2019 ")
        return 1.0 if tail.endswith(chars) else 0.0
    check.__name__ = f"ends_with_{chars!r}"
    return check


def opens_enthusiastically(t: TextView) -> float:
    first = t.stripped[: 200]
    end = re.search(r"[.!?]", first)
    return 1.0 if (end is not None and end.group() == "!") or ENTHUSIASTIC_OPENER.search(first) else 0.0


def opens_with_yes_or_no(t: TextView) -> float:
    return 1.0 if YES_NO_OPENER.search(t.stripped[:20]) else 0.0


def lowercase_sentence_starts(t: TextView) -> float:
    starts = [s.lstrip("\"'(*-\u2022 ")[:1] for s in t.sentences]
    starts = [c for c in starts if c.isalpha()]
    return sum(c.islower() for c in starts) / len(starts) if starts else 0.0


def _content_words(text: str) -> set[str]:
    return {w.lower() for w in _WORD.findall(text) if w.lower() not in STOP and len(w) > 2}


def restates_the_question(t: TextView) -> float:
    """Share of the prompt's content words that the answer's first sentence repeats."""
    asked = _content_words(t.prompt)
    if not asked or not t.sentences:
        return 0.0
    return len(asked & _content_words(t.sentences[0])) / len(asked)


def copies_from_the_prompt(t: TextView) -> float:
    """Share of the answer's word trigrams that occur in the prompt (extractive vs own words)."""
    words = [w.lower() for w in t.words]
    grams = {tuple(words[i: i + 3]) for i in range(len(words) - 2)}
    if not grams or not t.prompt:
        return 0.0
    pw = [w.lower() for w in _WORD.findall(t.prompt)]
    prompt_grams = {tuple(pw[i: i + 3]) for i in range(len(pw) - 2)}
    return len(grams & prompt_grams) / len(grams)


def rate(pattern: re.Pattern[str]) -> Callable[[TextView], float]:
    return lambda t: t.per_100_words(pattern)


def presence(pattern: re.Pattern[str]) -> Callable[[TextView], float]:
    return lambda t: t.has(pattern)


def _rate_feature(name: str, pattern: re.Pattern[str], what: str) -> Feature:
    return Feature(name, rate(pattern), f"use {what} more often", f"use {what} less often", "per 100 words")


def _presence_feature(name: str, pattern: re.Pattern[str] | Callable[[TextView], float], what: str) -> Feature:
    fn = presence(pattern) if isinstance(pattern, re.Pattern) else pattern
    return Feature(name, fn, f"{what} more often", f"{what} less often", binary=True)


FEATURES: tuple[Feature, ...] = (
    Feature("words", count_words, "are longer", "are shorter", "words"),
    Feature("sentences", count_sentences, "have more sentences", "have fewer sentences", "sentences"),
    Feature("words_per_sentence", words_per_sentence, "use longer sentences", "use shorter sentences",
            "words per sentence"),
    Feature("letters_per_word", letters_per_word, "use longer words", "use shorter words", "letters per word"),
    Feature("lines", count_lines, "are split over more lines", "are split over fewer lines", "lines"),
    _presence_feature("markdown", uses_markdown, "use markdown formatting (bold, headers, lists or code)"),
    _rate_feature("bold", BOLD, "bold text"),
    _rate_feature("bullets", BULLET, "bulleted list items"),
    _rate_feature("numbered_items", NUMBERED, "numbered list items"),
    _presence_feature("code", re.compile(r"```|(?<!`)`[^`\n]+`"), "contain code"),
    _rate_feature("exclamations", EXCLAMATION, "exclamation marks"),
    _presence_feature("ends_with_exclamation", ends_with("!"), "end with an exclamation mark"),
    _rate_feature("questions", QUESTION, "question marks"),
    _presence_feature("ends_with_question", ends_with("?"), "end with a question to the reader"),
    _presence_feature("enthusiastic_opener", opens_enthusiastically,
                      "open enthusiastically (an exclamation or an interjection such as \u201cGreat question\u201d)"),
    _presence_feature("yes_no_opener", opens_with_yes_or_no, "open with a plain yes or no"),
    _rate_feature("first_person_singular", FIRST_SINGULAR, "the first person singular (I, me, my)"),
    _rate_feature("first_person_plural", FIRST_PLURAL, "the first person plural (we, us, our)"),
    _rate_feature("second_person", SECOND_PERSON, "the second person (you, your)"),
    _rate_feature("contractions", CONTRACTION, "contractions (don't, it's, I'm)"),
    _rate_feature("hedges", HEDGES, "hedges (may, might, generally, typically)"),
    _rate_feature("boosters", BOOSTERS, "emphatic certainty words (definitely, clearly, always)"),
    _presence_feature("apology", APOLOGY, "apologise"),
    _presence_feature("refusal", REFUSAL,
                      "decline or say what they cannot do (\u201cas an AI\u201d, \u201cI cannot\u201d)"),
    _presence_feature("disclaimer", DISCLAIMER, "add a disclaimer or advise consulting a professional"),
    _presence_feature("stresses_importance", IMPORTANCE, "stress what is important (\u201cit is important to\u201d)"),
    _presence_feature("summary_phrase", SUMMARY, "sum up (\u201coverall\u201d, \u201cin conclusion\u201d)"),
    _rate_feature("numbers", NUMBER, "numbers"),
    _presence_feature("link", LINK, "contain a link or web address"),
    _presence_feature("emoji", EMOJI, "contain emojis"),
    _rate_feature("formal_connectors", CONNECTORS, "formal connectors (however, therefore, additionally)"),
    _rate_feature("colloquial_words", COLLOQUIAL, "colloquial words (yeah, gonna, stuff, lol)"),
    _rate_feature("ellipses", ELLIPSIS, "ellipses (...)"),
    _rate_feature("all_caps_words", ALL_CAPS, "words in capitals (acronyms or shouting)"),
    _presence_feature("lowercase_i", presence(LOWERCASE_I), "write \u201ci\u201d in lower case"),
    Feature("lowercase_sentence_starts", lowercase_sentence_starts, "start more sentences in lower case",
            "start fewer sentences in lower case", "share of sentences"),
    _rate_feature("parentheses", PARENTHESIS, "parentheses"),
    _rate_feature("quotation_marks", QUOTE, "double quotation marks"),
    _rate_feature("colons", COLON, "colons"),
    _rate_feature("semicolons", SEMICOLON, "semicolons"),
    _rate_feature("glued_sentences", GLUED,
                  "a sentence glued to the next without a space (often a lost line break)"),
    _rate_feature("space_before_punctuation", SPACE_BEFORE_PUNCT, "a space before punctuation (\u201cword .\u201d)"),
    _rate_feature("curly_quotes", CURLY_QUOTE, "curly quotation marks"),
    Feature("restates_question", restates_the_question, "repeat more of the prompt's words in their first sentence",
            "repeat fewer of the prompt's words in their first sentence", "share of the prompt's words"),
    Feature("copies_prompt", copies_from_the_prompt, "copy more of their wording from the prompt",
            "copy less of their wording from the prompt", "share of word triples"),
)
FEATURES_BY_NAME: Mapping[str, Feature] = MappingProxyType({f.name: f for f in FEATURES})


def feature(name: str) -> Feature:
    try:
        return FEATURES_BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown feature {name!r}; known: {sorted(FEATURES_BY_NAME)}") from None


def feature_matrix(texts: Sequence[str], prompts: Sequence[str] | None = None,
                   features: Sequence[Feature] = FEATURES) -> np.ndarray:
    """(len(texts), len(features)) values; each text is tokenised once for all features."""
    prompts = prompts if prompts is not None else [""] * len(texts)
    out = np.zeros((len(texts), len(features)), dtype=float)
    for i, (text, prompt) in enumerate(zip(texts, prompts, strict=True)):
        view = TextView(text, prompt)
        out[i] = [f.fn(view) for f in features]
    return out


class FeatureCache:
    """Feature rows by (text, prompt), owned by a caller that scores the same answers many times
    (pair-swap nulls relabel the same texts; a streaming service sees each text once per scorer)."""

    def __init__(self, features: Sequence[Feature] = FEATURES) -> None:
        self.features = tuple(features)
        self.index = {f.name: j for j, f in enumerate(self.features)}
        self._row_of: dict[tuple[str, str], int] = {}
        self._table = np.zeros((0, len(self.features)))
        self._terms: dict[str, frozenset[str]] = {}
        self._analyse = CountVectorizer(lowercase=True, token_pattern=TOKEN_PATTERN,
                                        ngram_range=(1, 2)).build_analyzer()

    def __len__(self) -> int:
        return len(self._row_of)

    def rows(self, texts: Sequence[str], prompts: Sequence[str]) -> np.ndarray:
        """Row numbers of the (text, prompt) pairs, computing the missing ones once."""
        keys = list(zip(texts, prompts, strict=True))
        missing = [k for k in dict.fromkeys(keys) if k not in self._row_of]
        if missing:
            new = feature_matrix([t for t, _ in missing], [p for _, p in missing], self.features)
            start = len(self._row_of)
            self._row_of.update((k, start + j) for j, k in enumerate(missing))
            self._table = np.vstack([self._table, new])
        return np.fromiter((self._row_of[k] for k in keys), dtype=np.int64, count=len(keys))

    def matrix(self, texts: Sequence[str], prompts: Sequence[str]) -> np.ndarray:
        rows = self.rows(texts, prompts)  # first: it may grow the table
        return self._table[rows]

    def column(self, name: str, texts: Sequence[str], prompts: Sequence[str]) -> np.ndarray:
        rows = self.rows(texts, prompts)
        return self._table[rows, self.index[name]]

    def terms(self, texts: Sequence[str]) -> list[frozenset[str]]:
        """Each text's distinct words and two-word phrases (the log-odds tokenisation, stop words kept)."""
        out = []
        for t in texts:
            got = self._terms.get(t)
            if got is None:
                got = self._terms[t] = frozenset(self._analyse(t))
            out.append(got)
        return out
