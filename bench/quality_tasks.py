"""The quality harness's retrieval tasks: keyed facts hidden at spread depths of one long haystack, one
question per fact, so the questions of a haystack share its prefilled prefix.

  passkey / needle / multikey (the first three, raw prompts, 7-digit values, 25 facts a haystack):
      "The pass key of <key> is <value>." in a noise haystack; "The secret number of ..." in Python
      standard-library source; multikey like needle where keys come in twins sharing a first word.
  niah_number / niah_word / niah_uuid (RULER's single-needle families, asked through the chat
      template): "The special magic number|word|code for <key> is <value>." in the noise haystack,
      values of 5 digits, one word, or a UUID.
  qa: a one-sentence fact about a person ("<name> lives in the town of <town>.") in standard-library
      source, asked as a question: the answer sits in one place of a natural document.
  niah_single / qa_single: RULER's single needle, 5 a haystack but each its own relation ("The secret
      code word is ...", "The treasure is buried in the city of ...", ...), so no fact looks like
      another (a 135M model confuses look-alike needles far more than it loses one in a long text);
      in the noise haystack or in standard-library source.
  vt: variable tracking, "VAR A = 12345." and later "VAR B = VAR A.", asked for B's value: the model
      must read two places.
A question is right when the answer's text starts within the first two characters of the reply
(spaces and case ignored).
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass

from bench.texts import stdlib_modules

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
WORDS = ("amber azure brisk cedar coral dusky ember frost golden hazel indigo jade lunar maple "
         "misty noble ochre olive pearl quiet rapid rusty silver solar stony tawny umber velvet windy "
         "zesty").split()
ANIMALS = ("falcon heron otter badger lynx marten osprey raven stoat tapir viper walrus yak zebra bison "
           "condor dingo egret ferret gecko ibis jackal koala lemur").split()
VALUE_WORDS = ("apple bridge candle desert engine forest garden hammer island jacket kettle ladder "
               "mirror needle orange pencil rabbit saddle tunnel violin window anchor basket button "
               "carpet dragon feather guitar helmet lantern magnet pillow rocket spider tomato wallet"
               ).split()
HAYSTACK_MODULES = ("argparse", "textwrap", "difflib", "inspect", "pathlib", "typing", "dataclasses")


@dataclass(frozen=True)
class Task:
    name: str
    haystack: str  # "noise" or "code"
    intro: str  # first line of the document, with {count}
    fact: str  # the hidden sentence, with {key} and {value}
    question: str  # with {key}
    answer: str  # the reply's start the prompt ends with, with {key}
    values: str  # "digits7", "digits5", "word", "uuid"
    needles: int  # facts (questions) per haystack
    chat: bool  # ask through the tokenizer's chat template
    twins: bool = False  # keys in pairs sharing their first word
    hop: str = ""  # variable tracking: the statement copying the value, with {key} and {source}
    distinct: bool = False  # each fact its own relation (RELATIONS): no look-alike distractors


def _raw(name: str, noun: str, haystack: str, twins: bool = False) -> Task:
    return Task(name, haystack, f"Below are {{count}} {noun}s hidden in a long text. Remember them.\n",
                f"The {noun} of {{key}} is {{value}}.", f"What is the {noun} of {{key}}?",
                f"The {noun} of {{key}} is", "digits7", 25, chat=False, twins=twins)


def _magic(name: str, what: str, values: str) -> Task:
    return Task(name, "noise", f"Some special magic {what}s are hidden in the text below. Memorize them.\n",
                f"The special magic {what} for {{key}} is {{value}}.",
                f"What is the special magic {what} for {{key}}?",
                f"The special magic {what} for {{key}} is", values, 10, chat=True)


# (fact's start, question, value kind): one of each per haystack for the `distinct` tasks.
RELATIONS = (
    ("The special magic number is", "What is the special magic number?", "digits5"),
    ("The secret code word is", "What is the secret code word?", "word"),
    ("The treasure is buried in the city of", "In which city is the treasure buried?", "city"),
    ("The meeting takes place in room", "In which room does the meeting take place?", "digits3"),
    ("The name of the ship's captain is", "What is the name of the ship's captain?", "name"),
)
CITIES = ("Paris Tokyo Cairo Lima Oslo Dublin Madrid Nairobi Toronto Sydney Berlin Lisbon Vienna Prague "
          "Athens Havana Moscow Mumbai Seoul Rome").split()
NAMES = ("Alice Bruno Clara Diego Elena Felix Greta Hugo Irene Jonas Karla Leon Mira Nadia Oscar Paula "
         "Rafael Sofia Tomas Vera").split()

TASKS: dict[str, Task] = {t.name: t for t in (
    _raw("passkey", "pass key", "noise"),
    _raw("needle", "secret number", "code"),
    _raw("multikey", "secret number", "code", twins=True),
    _magic("niah_number", "number", "digits5"),
    _magic("niah_word", "word", "word"),
    _magic("niah_uuid", "code", "uuid"),
    Task("qa", "code", "Read this source code; a few sentences about people are hidden in it.\n",
         "{key} lives in the town of {value}.", "In which town does {key} live?",
         "{key} lives in the town of", "word", 10, chat=True),
    Task("niah_single", "noise", "Some facts are hidden in the text below. Memorize them.\n",
         "{key} {value}.", "{key}", "{key}", "", len(RELATIONS), chat=True, distinct=True),
    Task("qa_single", "code", "Read this source code; a few facts are hidden in it.\n",
         "{key} {value}.", "{key}", "{key}", "", len(RELATIONS), chat=True, distinct=True),
    Task("vt", "noise", "Memorize the variable assignments hidden in the text below.\n",
         "VAR {key} = {value}.", "What is the value of VAR {key}?", "The value of VAR {key} is",
         "digits5", 5, chat=True, hop="VAR {key} = VAR {source}."),
)}


@dataclass
class Question:
    ids: list[int]  # question + the answer's start (after the shared prefix)
    answer: str
    depth: float  # where the value's sentence sits, 0 (start) .. 1 (end of the document)


def pieces(tokenizer, text: str) -> list[int]:
    """Ids of a piece spliced into a prompt: no special tokens (Gemma's tokenizer would put a BOS before
    every piece; SmolLM2's adds none, so its prompts are unchanged)."""
    return tokenizer.encode(text, add_special_tokens=False)


def chat_frame(tokenizer) -> tuple[str, str]:
    """The chat template's text before and after one user message (system prompt and BOS included)."""
    marker = "\x00MESSAGE\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                         add_generation_prompt=True)
    before, after = text.split(marker)
    return before, after


def keys_for(task: Task, count: int, rng: random.Random) -> list[str]:
    if task.distinct:  # fact starts; the questions are looked up in RELATIONS
        return [r[0] for r in rng.sample(RELATIONS, count)]
    if task.hop:  # variable names, one pair per question
        return ["".join(rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZ", k=5)) for _ in range(2 * count)]
    pairs = [f"{w}-{a}" for w in WORDS for a in ANIMALS]
    if task.name == "qa":
        pairs = [f"{w.title()} {a.title()}" for w in WORDS for a in ANIMALS]
    if not task.twins:
        return rng.sample(pairs, count)
    first = rng.sample(WORDS, -(-count // 2))
    return [f"{w}-{a}" for w in first for a in rng.sample(ANIMALS, 2)][:count]


def values_for(kind: str, count: int, rng: random.Random) -> list[str]:
    if kind == "digits7":
        return [str(rng.randrange(10**6, 10**7)) for _ in range(count)]
    if kind == "digits5":
        return [str(rng.randrange(10**4, 10**5)) for _ in range(count)]
    if kind == "digits3":
        return [str(rng.randrange(100, 1000)) for _ in range(count)]
    if kind in ("word", "city", "name"):
        return rng.sample({"word": VALUE_WORDS, "city": CITIES, "name": NAMES}[kind], count)
    return [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(count)]


def haystack(tokenizer, task: Task, length: int, needles: int, seed: int,
             group: int) -> tuple[list[int], list[Question]]:
    """-> (prefix ids shared by the group's questions, its questions)."""
    rng = random.Random(f"{task.name}/{length}/{seed}/{group}")
    keys = keys_for(task, needles, rng)
    if task.distinct:
        kinds = {r[0]: r[2] for r in RELATIONS}
        values = [values_for(kinds[k], 1, rng)[0] for k in keys]
    else:
        values = values_for(task.values, needles, rng)
    if task.hop:  # statement 2i sets key 2i to the value, statement 2i+1 copies it to key 2i+1
        statements = [s for i, v in enumerate(values) for s in (
            task.fact.format(key=keys[2 * i], value=v),
            task.hop.format(key=keys[2 * i + 1], source=keys[2 * i]))]
        asked = keys[1::2]
    else:
        statements = [task.fact.format(key=k, value=v) for k, v in zip(keys, values, strict=True)]
        asked = keys
    fact_ids = [pieces(tokenizer, f" {s} ") for s in statements]
    before, after = chat_frame(tokenizer) if task.chat else ("", "")
    if task.haystack == "noise":
        filler = pieces(tokenizer, NOISE * (length // 10))
    else:  # each group reads the standard library from its own offset
        text = stdlib_modules(HAYSTACK_MODULES)
        filler = pieces(tokenizer, text[group * len(text) // 16:] + text)
    bos = tokenizer.encode("")  # the BOS alone, where the tokenizer adds one
    head = pieces(tokenizer, before + task.intro.format(count=needles))
    if not (bos and head[:len(bos)] == bos):
        head = bos + head
    questions = {r[0]: r[1] for r in RELATIONS}
    tails = [pieces(tokenizer, f"\n{questions[k] if task.distinct else task.question.format(key=k)}{after}"
                    f"{'' if task.chat else ' '}{task.answer.format(key=k)}") for k in asked]
    fill = length - len(head) - sum(map(len, fact_ids)) - max(64, max(map(len, tails)) + 24)
    filler = filler[:fill]
    order = list(range(len(statements)))
    rng.shuffle(order)
    if task.hop:  # each assignment before its copy
        for j in range(0, len(order)):
            n = order[j]
            if n % 2 and order.index(n - 1) > j:
                i = order.index(n - 1)
                order[j], order[i] = order[i], order[j]
    ids = list(head)
    cut = [j * fill // (len(order) + 1) for j in range(len(order) + 2)]
    depth = {}
    for j, n in enumerate(order):  # facts at depths 1/(n+1) .. n/(n+1)
        ids += filler[cut[j]:cut[j + 1]] + fact_ids[n]
        depth[n] = (j + 1) / (len(order) + 1)
    ids += filler[cut[-2]:]
    step = 2 if task.hop else 1
    return ids, [Question(t, v, depth[step * i]) for i, (t, v) in enumerate(zip(tails, values, strict=True))]


def max_answer_tokens(tokenizer, questions: list[Question]) -> int:
    """Greedy tokens to generate: the longest answer, a leading space and two spare."""
    return max(len(pieces(tokenizer, f" {q.answer}.")) for q in questions) + 2


def is_right(reply: str, answer: str) -> bool:
    norm = answer.replace(" ", "").lower()
    return norm in reply.replace(" ", "").lower()[:len(norm) + 2]
