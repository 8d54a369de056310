"""Two disjoint pools of reviews and suffix words for the sentiment bypass: derivation, held-out.

A fix or probe is fitted on the *derivation* pool and judged on the *held-out* pool, so nothing
held out may share a review sentence or a suffix with what it was fitted on. Each pool owns its
own positive adjectives, negative adjectives, nouns, templates and neutral suffix words — every
one of the five lists is split in two, so the pools share no review and no suffix word at all
(hence no suffix word sequence either). The review vocabulary is the held-out third of
:func:`~analysis.scenarios._sentiment_head.make_reviews` (never seen when the head was
trained) plus the extra lists below, also never seen by the head; the suffix words are
:data:`~analysis.scenarios._sentiment_head.NEUTRAL_WORDS` (deduplicated).

Example::

    pools = make_pools(seed=0)
    d, h = pools["derivation"], pools["heldout"]
    set(d.suffix_words) & set(h.suffix_words)      # set()
    d.reviews(random.Random(0), 4)[0]              # ('Everyone said the gym was dire.', 0)
"""

from __future__ import annotations

import itertools
import random
from dataclasses import asdict, dataclass

from analysis.scenarios._sentiment_head import NEUTRAL_WORDS, heldout_vocabulary

__all__ = ["LEFT_OUT_ADJECTIVES", "POOL_NAMES", "Pool", "make_pools"]

POOL_NAMES = ("derivation", "heldout")
"""The two pools, in the order :func:`make_pools` returns them."""

_EXTRA_POS = ["splendid", "magnificent", "gorgeous", "exceptional", "phenomenal", "exquisite",
              "engaging", "uplifting", "heartwarming", "inspiring", "dazzling", "thrilling",
              "glorious", "joyful", "admirable", "top-notch", "entertaining", "masterful",
              "a delight"]
_EXTRA_NEG = ["atrocious", "abysmal", "dismal", "lame", "unbearable", "horrendous", "inferior",
              "pointless", "irritating", "lifeless", "clunky", "flimsy", "shabby", "worthless",
              "disastrous", "sluggish", "joyless", "underwhelming", "unreliable", "a disaster"]
#: Left out of the extra adjectives after one measurement: the head got fewer than 75 % of the
#: reviews using them right (it never learnt them), and the scenario studies bypasses of
#: reviews the classifier understands.
LEFT_OUT_ADJECTIVES = ("laughable", "second-rate", "first-rate", "captivating", "lovable",
                       "tiresome", "shoddy", "cheerful", "elegant", "flawless", "sublime",
                       "appalling", "substandard")
_EXTRA_NOUNS = ["sofa", "mattress", "blender", "spa", "gym", "theater", "sequel", "documentary",
                "comedy", "sandwich", "pasta", "salad", "dessert", "wine", "jacket", "backpack",
                "speaker", "tent", "resort", "flight", "cruise", "lecture", "workshop",
                "festival", "exhibit", "magazine", "website", "software", "charger", "kettle"]
_EXTRA_TEMPLATES = ["The {noun} felt {adj}.", "Overall, the {noun} is {adj}.",
                    "We thought the {noun} was {adj}.", "Everyone said the {noun} was {adj}.",
                    "That {noun} was simply {adj}.", "I think this {noun} is {adj}.",
                    "To be honest, the {noun} is {adj}.", "My review of the {noun}: {adj}.",
                    "The new {noun} is {adj}.", "After a week, the {noun} still seems {adj}.",
                    "Last night the {noun} was {adj}.", "It is fair to say the {noun} was {adj}.",
                    "Believe me, this {noun} is {adj}.", "What a {noun}, truly {adj}.",
                    "In my opinion the {noun} is {adj}.", "The whole {noun} was {adj}."]


@dataclass(frozen=True)
class Pool:
    """One pool's vocabulary: review parts and the neutral words its suffixes are built from.

    Example::

        pool = make_pools()["heldout"]
        pool.reviews(random.Random(1), 10)     # 5 positive + 5 negative (text, label) rows
    """

    name: str
    pos_adj: tuple[str, ...]
    neg_adj: tuple[str, ...]
    nouns: tuple[str, ...]
    templates: tuple[str, ...]
    suffix_words: tuple[str, ...]

    def all_reviews(self) -> list[tuple[str, int]]:
        """Every review of the pool, ``(text, label)`` (1 = positive), in a fixed order."""
        return [(t.format(noun=n, adj=a), lab)
                for lab, adjs in ((1, self.pos_adj), (0, self.neg_adj))
                for t, n, a in itertools.product(self.templates, self.nouns, adjs)]

    def reviews(self, rng: random.Random, n: int) -> list[tuple[str, int]]:
        """``n`` distinct reviews drawn by ``rng``, half positive, half negative, shuffled."""
        rows = self.all_reviews()
        pos = rng.sample([r for r in rows if r[1] == 1], n - n // 2)
        neg = rng.sample([r for r in rows if r[1] == 0], n // 2)
        out = pos + neg
        rng.shuffle(out)
        return out

    def stress_reviews(self, rng: random.Random, n: int) -> dict[str, list[tuple[str, int]]]:
        """Reviews unlike the single-sentence ones, ``n`` per kind, labels alternating: two
        sentences of one polarity, the sentiment only in a second sentence, a suffix word
        inside the sentence, suffix words before it (side effects of a fix beyond the
        template; the true label is the adjective list's).

        Example::

            make_pools()["heldout"].stress_reviews(random.Random(0), 2)["two_sentences"]
        """
        out: dict[str, list[tuple[str, int]]] = {
            k: [] for k in ("two_sentences", "second_sentence_only", "inner_neutral",
                            "prefix_neutral")}
        for i in range(n):
            lab = i % 2
            adjs = self.pos_adj if lab else self.neg_adj
            (t1, t2), (n1, n2) = rng.sample(self.templates, 2), rng.sample(self.nouns, 2)
            out["two_sentences"].append((f"{t1.format(noun=n1, adj=rng.choice(adjs))} "
                                         f"{t2.format(noun=n2, adj=rng.choice(adjs))}", lab))
            day = rng.choice(["monday", "sunday"])
            out["second_sentence_only"].append(
                (f"We went to the {n1} on {day} with a friend. It was {rng.choice(adjs)}.", lab))
            inner = t1.replace("{noun}", "{noun} near the " + rng.choice(self.suffix_words))
            out["inner_neutral"].append((inner.format(noun=n2, adj=rng.choice(adjs)), lab))
            pre = " ".join(rng.sample(self.suffix_words, rng.choice([1, 2, 3])))
            out["prefix_neutral"].append(
                (f"{pre}. {t2.format(noun=n1, adj=rng.choice(adjs))}", lab))
        return out

    def to_json(self) -> dict[str, object]:
        """The vocabulary as JSON (shipped beside the cases, so the split is documented)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _halves(items: list[str], rng: random.Random) -> tuple[list[str], list[str]]:
    xs = list(dict.fromkeys(items))  # dedupe, keep order
    rng.shuffle(xs)
    return xs[0::2], xs[1::2]


def make_pools(*, seed: int = 0) -> dict[str, Pool]:
    """The derivation and held-out pools (module doc); deterministic for ``seed``.

    Each source list (the head's held-out third, the extra lists, the neutral words) is split
    in two separately, so both pools mix old and new vocabulary alike.

    Example::

        make_pools()["derivation"].templates[:2]
    """
    rng = random.Random(f"sentiment-pools-{seed}")
    held = heldout_vocabulary(seed=seed)
    sources = {"pos_adj": [held["pos_adj"], _EXTRA_POS],
               "neg_adj": [held["neg_adj"], _EXTRA_NEG],
               "nouns": [held["nouns"], _EXTRA_NOUNS],
               "templates": [held["templates"], _EXTRA_TEMPLATES],
               "suffix_words": [NEUTRAL_WORDS]}
    parts: dict[str, tuple[list[str], list[str]]] = {}
    for key, lists in sources.items():
        a: list[str] = []
        b: list[str] = []
        for xs in lists:
            ha, hb = _halves(xs, rng)
            a += ha
            b += hb
        parts[key] = (a, b)
    return {name: Pool(name=name, **{k: tuple(v[i]) for k, v in parts.items()})
            for i, name in enumerate(POOL_NAMES)}
