"""Answer normalisation for open-ended VQA scoring, reproduced from the reference scripts.

Two processors, kept separate because the benchmarks use them differently:

* ``normalize_vqa_answer`` mirrors the official VQA evaluator,
  ``GT-Vision-Lab/VQA: PythonEvaluationTools/vqaEvaluation/vqaEval.py`` (``VQAEval``):
  ``processPunctuation`` then ``processDigitArticle`` on the model's answer. The VQAv2
  server applies it to every submitted answer.
* ``evalai_answer`` mirrors ``EvalAIAnswerProcessor`` in LLaVA's
  ``llava/eval/m4c_evaluator.py`` (copied there from mmf/pythia): lower-case, drop ``,``
  and ``?``, split ``'s``, then the same punctuation / digit / article steps. LLaVA runs
  it over VQAv2 predictions before submission (``scripts/convert_vqav2_for_submission.py``)
  and over both predictions and human answers for TextVQA (``TextVQAAccuracyEvaluator``).

The tables and regexes are copied verbatim, quirks included, so scores match the
reference scripts exactly rather than "fixing" them:

* ``PERIOD_STRIP`` starts with ``(?!<=\\d)``, a negative *lookahead* for the literal
  ``<=`` followed by a digit (the authors meant a lookbehind). In effect it deletes every
  ``.`` not followed by a digit: ``"yes."`` -> ``"yes"``, ``"3.5"`` kept, ``"5."`` -> ``"5"``.
* The reference passes ``re.UNICODE`` (== 32) positionally to ``Pattern.sub``, where it
  is the ``count`` argument: at most 32 periods are removed. Kept as ``count=32``.
* A punctuation mark is *deleted* if it touches a space anywhere in the input (``"p "`` or
  ``" p"``) or if the input contains a digit-comma-digit; otherwise it becomes a space.
  The test is on the original input, not the partly processed text.
* Contraction keys such as ``"Im"`` and ``"Ive"`` can never match (words are lower-cased
  first); ``"somebody'd"`` maps to ``"somebodyd"``. Both as in the original.
"""

from __future__ import annotations

import re

CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}

# ``manualMap`` in vqaEval.py, ``NUMBER_MAP`` in m4c_evaluator.py.
NUMBER_MAP = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = ("a", "an", "the")

PUNCTUATIONS = (
    ";",
    r"/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)

PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
# vqaEval.py's ``commaStrip``; m4c_evaluator.py uses EVALAI_COMMA_STRIP. Both only serve
# as a "does the text contain a digit,digit" test inside process_punctuation.
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
EVALAI_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")

# ``re.UNICODE`` passed positionally as Pattern.sub's ``count`` in both reference scripts.
_PERIOD_STRIP_COUNT = int(re.UNICODE)


def process_punctuation(text: str, comma_strip: re.Pattern = COMMA_STRIP) -> str:
  """``VQAEval.processPunctuation`` / ``EvalAIAnswerProcessor.process_punctuation``.

  Each mark in PUNCTUATIONS is deleted when it touches a space in ``text`` or when
  ``text`` holds a digit-comma-digit (so ``"1,000"`` -> ``"1000"``), else replaced by a
  space (``"hot-dog"`` -> ``"hot dog"``); then periods not followed by a digit go.
  """
  out = text
  has_digit_comma = comma_strip.search(text) is not None
  for p in PUNCTUATIONS:
    if (p + " " in text or " " + p in text) or has_digit_comma:
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  return PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
  """``VQAEval.processDigitArticle``: lower-case, number words -> digits, drop a/an/the,
  expand contractions written without apostrophe (``"dont"`` -> ``"don't"``), and
  re-join on single spaces."""
  words = [NUMBER_MAP.get(w, w) for w in text.lower().split()]
  words = [w for w in words if w not in ARTICLES]
  return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(text: str) -> str:
  """The official VQA evaluator's treatment of a result answer (vqaEval.py, ``evaluate``):
  newlines/tabs to spaces, strip, processPunctuation, processDigitArticle."""
  text = text.replace("\n", " ").replace("\t", " ").strip()
  return process_digit_article(process_punctuation(text))


def evalai_answer(text: str) -> str:
  """``EvalAIAnswerProcessor.__call__`` from LLaVA's m4c_evaluator.py.

  ``word_tokenize`` (lower-case, delete ``,`` and ``?``, ``'s`` -> `` 's``, strip), then
  newlines/tabs to spaces, strip, punctuation with the EvalAI comma regex, digits/articles.
  ``"The poster shows a 10% discount."`` -> ``"poster shows 10% discount"``.
  """
  text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
  text = text.replace("\n", " ").replace("\t", " ").strip()
  text = process_punctuation(text, comma_strip=EVALAI_COMMA_STRIP)
  return process_digit_article(text)
