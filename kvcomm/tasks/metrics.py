"""Answer scoring: the KVComm paper's thresholded set-F1, exact match and containment.

The paper normalises with NLTK's WordNet lemmatiser, whose corpora must be downloaded at run
time. kvcomm lemmatises with simplemma, which ships its data; it has no part-of-speech step, so a
few words lemmatise differently (e.g. "saw" becomes "see" even as a noun, "us" becomes "we" and
"leaves" "leave"). Everything else follows the paper:
lowercase, drop punctuation and articles, collapse whitespace, compare token *sets*, and count an
item as correct when F1 > 0.5, taking the best gold answer.

Two choices to know. Punctuation becomes a space, where SQuAD-style normalisers delete it ("U.S."
reads "u s", "Trace-LLC" matches "Trace LLC"); no gold answer of Countries or Tipsheets holds
punctuation. A point or a colon between two digits stays, so a decimal or a time is one word
("3.14", "10:30") and "5.2" no longer matches "2.5" (both were the set {5, 2}); other marks still
part numbers ("1939-1945" reads "1939 1945", as "from 1939 to 1945" does, and "1,2,3" reads as
"1, 2, 3"; a date "1999-03-02" is still the set of its parts). A gold answer made only of articles (a multiple-choice
letter "A") is compared with the articles kept, on both sides, where the paper's rule would leave
it empty and unscorable; the letter A is found in a prediction against any one-letter gold, so
that every letter scores alike; and an empty gold answer matches nothing.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence

import simplemma

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(text: str, articles: bool = False) -> str:
    """Lowercase, straighten quotes, drop punctuation and articles (``articles``: keep them),
    lemmatise (which capitalises proper nouns again: "lisbon" becomes "Lisbon", on both sides of a
    comparison alike), collapse spaces."""
    text = _words(text.lower())
    text = text if articles else _ARTICLES.sub(" ", text)
    return " ".join(simplemma.lemmatize(word, lang="en") for word in text.split())


def _words(text: str) -> str:
    """Quotes straightened, punctuation made spaces (but a point or colon between two digits kept),
    spaces collapsed; case kept."""
    text = text.replace("\u2019", "'")
    return " ".join("".join(
        " " if unicodedata.category(ch).startswith("P") and not _between_digits(text, i) else ch
        for i, ch in enumerate(text)).split())


def _between_digits(text: str, index: int) -> bool:
    return text[index] in ".:" and 0 < index < len(text) - 1 and text[index - 1].isdigit() \
        and text[index + 1].isdigit()


LETTER_A = re.compile(
    r"^\W*\(?a\)?\W*$"  # the answer is the letter alone: "A", "(a)", "A."
    r"|^\W*\(?a\)?(?=[.):,;]|\s*[-\u2013\u2014](?!\w)|\s*\n)"  # it opens the answer, marked: "A) Paris",
    # "A - Paris", "A\nParis" (not "A-list")
    r"|\(a\)"  # in parentheses anywhere: "The answer is (A)."
    r"|\b(?:answer|option|choice)\b\W*(?:is\W+)?(?:option\W+|choice\W+)?\(?a\b"  # "answer: a", "Option A: Paris",
    r"(?!\W*[a-z0-9])|\b(?:answer|option|choice)\b\W*(?:is\W+)?(?:option\W+|choice\W+)?\(?a\)?"  # "the answer is
    r"(?=\s*[-\u2013\u2014.):;](?!\w)|\s*\n|\s+because\b)"  # A because …", not "… a city" nor "A.I."
    r"|\ba\b(?=\W*$|\s*[,/]|\s+(?:or|and|is|was|seems)\b)",  # no article stands there: "I think A", "A or B"
    re.IGNORECASE)
"""Where an answer names the choice letter A, which is also the article "a": alone, opening the
answer with a mark after it (a stop, a bracket, a colon, a dash, a new line), in parentheses,
after "answer", "option" or "choice" with nothing following it or a mark or "because", or where
an article cannot stand (last, or before a comma, a slash, "or", "and", "is", "was" or
"seems"). An article ("A guess: B", "it is a trick", "the answer is a city") is none of these.
The other letters are words of their own, so a letter A that is none of these (e.g. "I would go
with A here") scores below the same answer naming B."""


def _pair(prediction: str, gold: str) -> tuple[str, str]:
    """Both normalised, the articles kept where the gold answer is nothing but articles. The choice
    letter "A" is told from the article: against any one-letter gold the prediction is normalised
    as usual (articles dropped) and given the token ``A`` where :data:`LETTER_A` finds the letter,
    so that every letter scores alike ("A or B" is "or b A" for gold A and for gold B: before,
    only gold A's saw the A, and the hedge was half B but a third A)."""
    letter = _words(gold).lower()
    if len(letter) == 1 and letter.isalpha():
        named = " A" if LETTER_A.search(prediction) else ""
        return (normalize(prediction) + named).strip(), "A" if letter == "a" else normalize(gold)
    ref = normalize(gold)
    if ref:
        return normalize(prediction), ref
    return normalize(prediction, articles=True), normalize(gold, articles=True)


def set_f1(prediction: str, gold: str) -> float:
    """F1 between the normalised token sets of ``prediction`` and ``gold``."""
    pred, ref = (set(text.split()) for text in _pair(prediction, gold))
    common = len(pred & ref)
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def paper_f1(prediction: str, golds: Sequence[str]) -> float:
    """1.0 if the set-F1 against some gold answer exceeds 0.5, else 0.0 (the paper's "F1").

    As in the paper's code, a word that two-word gold answers share scores alone: every Tipsheets
    option ends in "LLC", and "LLC" has precision 1 and recall 0.5 against "Sable LLC" (F1 0.67);
    :func:`contains` does not credit it."""
    return float(any(set_f1(prediction, gold) > 0.5 for gold in golds))


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals some normalised gold answer (an empty one matches nothing)."""
    return float(any(pred == ref and ref for pred, ref in (_pair(prediction, gold) for gold in golds)))


def contains(prediction: str, golds: Sequence[str]) -> float:
    """1.0 if some normalised gold answer occurs in the normalised prediction (word-aligned)."""
    return float(any(f" {ref} " in f" {pred} " for pred, ref in (_pair(prediction, gold) for gold in golds) if ref))


METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "paper_f1": paper_f1,
    "exact_match": exact_match,
    "contains": contains,
}


def score_all(prediction: str, golds: Sequence[str]) -> dict[str, float]:
    """Every metric of ``prediction`` against ``golds`` (what results record per item)."""
    return {name: fn(prediction, golds) for name, fn in METRICS.items()}
