"""VQA-style answer normalisation: the rules of the official VQA evaluation, written for mllm.

Lower-case; strip punctuation (keeping decimal points and digit commas); number words → digits;
drop articles; restore common contractions. So "Two dogs!" and "2 dogs" compare equal.
"""

from __future__ import annotations

import re

_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
# Answers written without the apostrophe are mapped to the spelling annotators used most.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "didnt": "didn't",
    "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't",
    "hes": "he's", "im": "i'm", "isnt": "isn't", "itll": "it'll", "ive": "i've", "shouldnt": "shouldn't",
    "thats": "that's", "theres": "there's", "theyre": "they're", "wasnt": "wasn't", "werent": "weren't",
    "whats": "what's", "wont": "won't", "wouldnt": "wouldn't", "youre": "you're", "youve": "you've",
}  # fmt: skip
_PUNCT = ';/[]"{}()=+\\_-><@`,?!'  # the official list; the apostrophe stays (contractions)
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"\.(?!\d)")  # a period that is not a decimal point ("3.5" keeps its own)


def _strip_punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        # A mark glued between words ("black-and-white") becomes a space; one beside a space just goes.
        if f"{p} " in text or f" {p}" in text or _DIGIT_COMMA.search(text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out)


def _map_words(text: str) -> str:
    words = []
    for w in text.lower().split():
        w = _NUMBER_WORDS.get(w, w)
        if w in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def normalize_answer(answer: str) -> str:
    """VQA normalisation: `"Two dogs!"` → `"2 dogs"`, `"A Red Circle."` → `"red circle"`."""
    text = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    return _map_words(_strip_punctuation(text))
