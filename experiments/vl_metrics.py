"""Vision-language metrics of the paper's Table 4: CIDEr-D (captions) and the standard VQA accuracy (answers).

Both are re-implementations in plain Python (no Java, no download) of the reference code:

* :func:`cider_d` — ``pyciderevalcap``'s ``CiderD`` (as in ``coco-caption``): n-grams n = 1..4, TF-IDF vectors with
  document frequencies from the references of the evaluated set (``df="corpus"``), the candidate's n-gram weights
  clipped at the reference's (``min(vec_hyp, vec_ref) · vec_ref``), a Gaussian length penalty with σ = 6 on the
  difference of lengths (counted, as the reference does, from the bigram term frequencies), averaged over the
  references and n, times 10. Sentences are first tokenized like ``PTBTokenizer`` in ``pycocoevalcap``: lower case,
  Penn-Treebank word splitting (punctuation and clitics ``'s n't 're 've 'll 'd 'm`` become tokens), then the
  punctuation tokens ``'' ' `` ` -LRB- -RRB- -LCB- -RCB- . ? ! , : - -- ... ;`` are dropped (:func:`ptb_tokenize`).
  Brackets are dropped like their ``-LRB-`` forms.
* :func:`vqa_accuracy` — the official VQA evaluation (``vqaEval.py``): the prediction is normalised
  (punctuation, number words → digits, articles removed, contractions restored); when the human answers disagree,
  their punctuation is normalised too; the accuracy is ``min(#matching other humans / 3, 1)`` averaged over the
  leave-one-out subsets of the human answers (10 choose 9 for VQA's ten). A question with a single reference answer
  (ScienceQA's multiple choice) has no leave-one-out subset; it scores exact match after normalisation.

>>> round(vqa_accuracy("Two", ["2"] * 3 + ["3"] * 7), 4)
0.9
>>> score, per = cider_d(["a cat on a table"], [["a cat sits on the table", "a cat on a table"]])
>>> per.shape
(1,)
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from typing import Sequence

import numpy as np

__all__ = ["ptb_tokenize", "cider_d", "vqa_accuracy", "normalize_answer", "process_punctuation",
           "process_digit_article"]

# ------------------------------------------------------------------------------------------------ tokenization

_PUNCT_TOKENS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
                 "...", ";", "(", ")", "[", "]", "{", "}"}
_CLITICS = re.compile(r"(?i)('s|'m|'d|'ll|'re|'ve|n't)$")


def ptb_tokenize(text: str) -> list[str]:
    """Lower-cased Penn-Treebank-style tokens with punctuation tokens removed (``PTBTokenizer``'s effect)."""
    text = text.lower().replace("\n", " ").replace("\t", " ")
    text = re.sub(r'"', " '' ", text)
    text = re.sub(r"\.\.\.", " ... ", text)
    text = re.sub(r"--", " -- ", text)
    text = re.sub(r"([,;:!?()\[\]{}])", r" \1 ", text)
    text = re.sub(r"([^\s.])\.(\s|$)", r"\1 .\2", text)  # a period ending a word (not an ellipsis)
    tokens = []
    for word in text.split():
        m = _CLITICS.search(word)
        if m and m.start() > 0:
            tokens += [word[: m.start()], word[m.start():]]
        elif word.startswith("'") and len(word) > 1 and not _CLITICS.match(word):
            tokens += ["'", word[1:]]
        else:
            tokens.append(word)
    out = []
    for t in tokens:
        # a word with inner hyphens stays one token; standalone dashes go
        if t in _PUNCT_TOKENS or re.fullmatch(r"-+", t):
            continue
        out.append(t.strip("'") if t not in ("'s", "'m", "'d", "'ll", "'re", "'ve") else t)
    return [t for t in out if t]


# ------------------------------------------------------------------------------------------------ CIDEr-D

def _ngrams(words: Sequence[str], n: int = 4) -> Counter:
    counts: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i:i + k])] += 1
    return counts


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]], *, n: int = 4, sigma: float = 6.0,
            tokenize: bool = True) -> tuple[float, np.ndarray]:
    """CIDEr-D of ``candidates[i]`` against ``references[i]`` (a list of reference captions per item).

    Returns ``(corpus score, per-item scores (N,))`` in float64; the corpus score is the mean (coco-caption reports it
    as is, papers often ×100). ``tokenize=False`` takes the strings as already tokenized (split on spaces).
    """
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
    if not candidates:
        raise ValueError("CIDEr-D needs at least one candidate")
    tok = ptb_tokenize if tokenize else str.split
    cands = [_ngrams(tok(c), n) for c in candidates]
    refs = []
    for i, rs in enumerate(references):
        if not rs:
            raise ValueError(f"item {i} has no reference captions")
        refs.append([_ngrams(tok(r), n) for r in rs])
    df: Counter = Counter()
    for rs in refs:
        for gram in {g for r in rs for g in r}:
            df[gram] += 1
    log_n = math.log(float(len(refs)))

    def vec(counts: Counter):
        v = [defaultdict(float) for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for gram, tf in counts.items():
            k = len(gram) - 1
            v[k][gram] = float(tf) * (log_n - math.log(max(1.0, df[gram])))
            norm[k] += v[k][gram] ** 2
            if k == 1:  # the reference implementation counts the length from bigrams
                length += tf
        return v, [math.sqrt(x) for x in norm], length

    scores = np.zeros(len(cands), np.float64)
    for i, (c, rs) in enumerate(zip(cands, refs)):
        vc, nc, lc = vec(c)
        total = np.zeros(n, np.float64)
        for r in rs:
            vr, nr, lr = vec(r)
            delta = float(lc - lr)
            val = np.zeros(n, np.float64)
            for k in range(n):
                for gram in vc[k]:
                    val[k] += min(vc[k][gram], vr[k][gram]) * vr[k][gram]
                if nc[k] != 0 and nr[k] != 0:
                    val[k] /= nc[k] * nr[k]
                val[k] *= math.e ** (-(delta ** 2) / (2 * sigma ** 2))
            total += val
        scores[i] = float(np.mean(total)) / len(rs) * 10.0
    return float(np.mean(scores)), scores


# ------------------------------------------------------------------------------------------------ VQA accuracy

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't",
    "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am",
    "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've"}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def process_punctuation(text: str) -> str:
    """``vqaEval.processPunctuation``: punctuation removed (next to a space, or when a digit-comma-digit occurs) or
    replaced by a space; periods not followed by a digit removed (at most 32 of them, as the reference's
    ``sub(..., re.UNICODE)`` passes 32 as the count)."""
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=int(re.UNICODE))


def process_digit_article(text: str) -> str:
    """``vqaEval.processDigitArticle``: lower case, number words → digits, articles dropped, contractions restored."""
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(answer: str) -> str:
    """The prediction's normalisation: whitespace, punctuation, digits/articles/contractions."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(answer))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The VQA accuracy of one prediction against the human ``answers`` (see the module docstring), in [0, 1]."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = normalize_answer(prediction)
    gts = list(answers)
    if len(set(gts)) > 1:
        gts = [process_punctuation(a) for a in gts]
    if len(gts) == 1:
        return float(pred == normalize_answer(gts[0]))
    accs = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1:]
        accs.append(min(1.0, sum(1 for a in others if a == pred) / 3.0))
    return float(sum(accs)) / len(accs)
