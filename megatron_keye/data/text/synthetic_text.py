"""Deterministic English-like text for tokenizer training and tiny language-model demos.

Documents are drawn from a small templated grammar over a few hundred words: a document has a
topic (its nouns, verbs, adjectives and places) and a few named characters who recur, and its
sentences come from about a dozen templates with number agreement (one fox runs / two foxes run),
past tense, counting with simple arithmetic (has 7, gives 2, has 5 left), questions with their
answers and short subordinate clauses. A language model can learn a lot of this (agreement,
template shapes, topic vocabulary, the arithmetic) and its loss falls clearly, but the text is not
periodic: every choice is random, from one seeded generator, so a seed fixes the corpus.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


NUMBER_WORDS = _words(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty"
)
NAMES = _words(
    "Anna Ben Clara David Emma Felix Grace Hugo Iris Jack Lena Marco Nora Oscar Paula Quinn Rosa "
    "Sam Tara Victor Wendy Yusuf Zoe Omar Mia Leo"
)
FEMALE = frozenset(_words("Anna Clara Emma Grace Iris Lena Nora Paula Rosa Tara Wendy Zoe Mia"))


@dataclass(frozen=True)
class Verb:
    base: str
    third: str
    past: str


@dataclass(frozen=True)
class Topic:
    name: str
    nouns: tuple[tuple[str, str], ...]  # (singular, plural)
    verbs: tuple[Verb, ...]  # transitive: "<subject> <verb> the <object>"
    intransitive: tuple[Verb, ...]
    adjectives: tuple[str, ...]
    places: tuple[str, ...]


def _nouns(text: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in text.split():
        singular, _, plural = item.partition("/")
        pairs.append((singular, plural or singular + "s"))
    return tuple(pairs)


def _verbs(text: str) -> tuple[Verb, ...]:
    verbs = []
    for item in text.split():
        base, third, past = item.split("/")
        verbs.append(Verb(base, third, past))
    return tuple(verbs)


TOPICS = (
    Topic(
        "farm",
        _nouns(
            "cow horse sheep/sheep goat pig duck hen fox/foxes dog cat farmer barn field "
            "apple tree/trees fence tractor"
        ),
        _verbs(
            "feed/feeds/fed watch/watches/watched chase/chases/chased follow/follows/followed "
            "find/finds/found carry/carries/carried clean/cleans/cleaned"
        ),
        _verbs("sleep/sleeps/slept run/runs/ran eat/eats/ate rest/rests/rested wait/waits/waited"),
        ("small", "brown", "old", "quiet", "hungry", "lazy", "young", "white"),
        ("barn", "field", "meadow", "stable", "pond", "orchard"),
    ),
    Topic(
        "city",
        _nouns(
            "bus/buses car train bike shop/shops market street bridge tower cafe baker "
            "driver child/children box/boxes ticket lamp"
        ),
        _verbs(
            "build/builds/built paint/paints/painted sell/sells/sold buy/buys/bought "
            "open/opens/opened close/closes/closed visit/visits/visited"
        ),
        _verbs("wait/waits/waited stop/stops/stopped move/moves/moved work/works/worked"),
        ("busy", "tall", "new", "crowded", "bright", "narrow", "red", "noisy"),
        ("station", "square", "harbor", "library", "park", "museum"),
    ),
    Topic(
        "kitchen",
        _nouns(
            "cook pot/pots pan plate cup spoon knife/knives bowl bread cake soup lemon "
            "tomato/tomatoes onion egg table"
        ),
        _verbs(
            "cut/cuts/cut wash/washes/washed cook/cooks/cooked bake/bakes/baked "
            "stir/stirs/stirred serve/serves/served taste/tastes/tasted"
        ),
        _verbs("boil/boils/boiled cool/cools/cooled burn/burns/burned rise/rises/rose"),
        ("hot", "fresh", "sweet", "sour", "clean", "heavy", "warm", "green"),
        ("kitchen", "oven", "garden", "shelf", "cellar", "window"),
    ),
    Topic(
        "school",
        _nouns(
            "teacher student book pencil map desk lesson class/classes word number "
            "question/questions answer picture clock robot"
        ),
        _verbs(
            "read/reads/read write/writes/wrote draw/draws/drew count/counts/counted "
            "explain/explains/explained solve/solves/solved check/checks/checked"
        ),
        _verbs(
            "listen/listens/listened learn/learns/learned think/thinks/thought laugh/laughs/laughed"
        ),
        ("clever", "long", "short", "difficult", "simple", "careful", "curious", "blue"),
        ("classroom", "hall", "library", "yard", "lab", "office"),
    ),
    Topic(
        "sea",
        _nouns(
            "boat ship sailor fish/fish wave shell crab bird island rope net storm "
            "captain whale/whales rock"
        ),
        _verbs(
            "pull/pulls/pulled catch/catches/caught sail/sails/sailed see/sees/saw "
            "fix/fixes/fixed lift/lifts/lifted throw/throws/threw"
        ),
        _verbs("swim/swims/swam float/floats/floated sink/sinks/sank dive/dives/dove"),
        ("blue", "wild", "calm", "deep", "strong", "cold", "grey", "tiny"),
        ("beach", "harbor", "bay", "coast", "deck", "lighthouse"),
    ),
)

PREPOSITIONS = ("in", "near", "behind", "beside", "under", "across")
ADVERBS = ("slowly", "quickly", "quietly", "again", "together", "carefully", "early", "late")
CONNECTIVES = ("because", "while", "after", "before", "when")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


class _Writer:
    """Builds the sentences of one document around its topic and characters."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.topic = rng.choice(TOPICS)
        self.names = rng.sample(NAMES, 3)

    def noun(self) -> tuple[str, str]:
        return self.rng.choice(self.topic.nouns)

    def count_phrase(self, count: int, noun: tuple[str, str]) -> str:
        word = NUMBER_WORDS[count] if count <= 20 and self.rng.random() < 0.6 else str(count)
        return f"{word} {noun[0] if count == 1 else noun[1]}"

    def subject(self) -> tuple[str, bool]:
        """A noun phrase and whether it is plural (for verb agreement)."""
        noun = self.noun()
        roll = self.rng.random()
        adjective = self.rng.choice(self.topic.adjectives)
        if roll < 0.4:
            return f"the {adjective} {noun[0]}", False
        if roll < 0.7:
            return f"the {noun[1]}", True
        if roll < 0.85:
            count = self.rng.randint(2, 12)
            return self.count_phrase(count, noun), True
        return self.rng.choice(self.names), False

    def pronoun(self, name: str) -> str:
        return "she" if name in FEMALE else "he"

    def sentence(self) -> str:
        rng = self.rng
        kind = rng.randrange(12)
        place = rng.choice(self.topic.places)
        if kind <= 2:
            subject, plural = self.subject()
            verb = rng.choice(self.topic.verbs)
            obj = self.noun()
            tail = f" {rng.choice(PREPOSITIONS)} the {place}" if rng.random() < 0.6 else ""
            return f"{subject} {verb.base if plural else verb.third} the {obj[0]}{tail}."
        if kind <= 4:
            subject, plural = self.subject()
            verb = rng.choice(self.topic.intransitive)
            adverb = f" {rng.choice(ADVERBS)}" if rng.random() < 0.5 else ""
            verb_form = verb.base if plural else verb.third
            preposition = rng.choice(PREPOSITIONS)
            return f"{subject} {verb_form}{adverb} {preposition} the {place}."
        if kind == 5:
            name, other = rng.sample(self.names, 2)
            noun = self.noun()
            have = rng.randint(3, 20)
            give = rng.randint(1, have - 1)
            return (
                f"{name} has {self.count_phrase(have, noun)}. {self.pronoun(name).capitalize()} "
                f"gives {give} to {other}, so {name} has "
                f"{self.count_phrase(have - give, noun)} left."
            )
        if kind == 6:
            name = rng.choice(self.names)
            noun = self.noun()
            first, second = rng.randint(1, 9), rng.randint(1, 9)
            return (
                f"{name} saw {self.count_phrase(first, noun)} in the morning and "
                f"{self.count_phrase(second, noun)} in the evening, "
                f"{self.count_phrase(first + second, noun)} in all."
            )
        if kind == 7:
            name = rng.choice(self.names)
            noun = self.noun()
            count = rng.randint(1, 15)
            return (
                f"How many {noun[1]} are in the {place}? There "
                f"{'is' if count == 1 else 'are'} {self.count_phrase(count, noun)} in the {place}."
            )
        if kind == 8:
            first, _ = self.subject()
            verb_a = rng.choice(self.topic.intransitive)
            second, plural = self.subject()
            verb_b = rng.choice(self.topic.verbs)
            return (
                f"{rng.choice(CONNECTIVES).capitalize()} {first} {verb_a.past}, {second} "
                f"{verb_b.past} the {self.noun()[0]}."
            )
        if kind == 9:
            name = rng.choice(self.names)
            verb = rng.choice(self.topic.verbs)
            return f"On {rng.choice(DAYS)}, {name} {verb.past} the {self.noun()[1]} at the {place}."
        if kind == 10:
            items = rng.sample(self.topic.nouns, 3)
            first, second, third = (_with_article(item[0]) for item in items)
            return f"The {place} has {first}, {second} and {third}."
        name = rng.choice(self.names)
        adjective = rng.choice(self.topic.adjectives)
        noun = self.noun()
        return f"{name} thinks that the {noun[0]} is {adjective} and {self.pronoun(name)} is right."


def _with_article(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def _capitalize(sentence: str) -> str:
    return sentence[0].upper() + sentence[1:]


def generate_documents(
    num_documents: int, *, seed: int, min_sentences: int = 3, max_sentences: int = 8
) -> list[str]:
    """`num_documents` documents of `min_sentences`..`max_sentences` sentences each.

    The same seed gives the same documents.
    """
    if num_documents < 0:
        raise ValueError(f"num_documents must be >= 0, got {num_documents}")
    if not 1 <= min_sentences <= max_sentences:
        raise ValueError(
            f"need 1 <= min_sentences <= max_sentences, got {min_sentences}, {max_sentences}"
        )
    rng = random.Random(seed)
    documents = []
    for _ in range(num_documents):
        writer = _Writer(rng)
        count = rng.randint(min_sentences, max_sentences)
        documents.append(" ".join(_capitalize(writer.sentence()) for _ in range(count)))
    return documents


def vocabulary() -> set[str]:
    """Every word the grammar can emit (without numbers written as digits)."""
    words: set[str] = set(NUMBER_WORDS) | set(NAMES) | set(PREPOSITIONS) | set(ADVERBS)
    words |= set(CONNECTIVES) | set(DAYS)
    for topic in TOPICS:
        for singular, plural in topic.nouns:
            words |= {singular, plural}
        for verb in topic.verbs + topic.intransitive:
            words |= {verb.base, verb.third, verb.past}
        words |= set(topic.adjectives) | set(topic.places)
    return words
