"""Calibration and evaluation sets built from corpora that exist offline on any
machine with Python: the standard library's source (code), the reference
documentation that ships with Python (prose), and generated arithmetic word
problems with answers (math). The same corpora train scripts/make_finetunes.py's
fine-tunes; every HELD_OUT_EVERY-th document is held out from training, and the
held-out documents are split again so that profiles are measured on one half
and benchmarks report quality on the other.
"""
from __future__ import annotations

import json
import os
import random
import sysconfig
from dataclasses import dataclass

HELD_OUT_EVERY = 10
MATH_NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goro", "Hana"]
MATH_THINGS = ["apples", "books", "coins", "marbles", "pencils", "stamps", "cards", "shells"]


@dataclass(frozen=True)
class Item:
    """A context that a sender prefills, a question the receiver then reads, and
    the answer it should produce (None where the set has none)."""
    context: str
    question: str
    answer: str | None = None
    domain: str = ""


def code_docs(limit: int) -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    names = sorted(n for n in os.listdir(root) if n.endswith(".py"))
    out = []
    for n in names[:limit]:
        with open(os.path.join(root, n), encoding="utf-8", errors="replace") as f:
            out.append(f.read())
    return out


def docs_docs(limit: int) -> list[str]:
    from pydoc_data.topics import topics
    return [topics[k] for k in sorted(topics)][:limit]


def math_problem(rng: random.Random) -> tuple[str, str]:
    """One word problem: (question, worked answer)."""
    who, what = rng.choice(MATH_NAMES), rng.choice(MATH_THINGS)
    a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 9)
    kind = rng.randrange(4)
    if kind == 0:
        q, work, ans = f"{who} has {a} {what} and gets {b} more. How many {what} does {who} have?", f"{a} + {b}", a + b
    elif kind == 1:
        a, b = max(a, b), min(a, b)
        q, work, ans = f"{who} has {a} {what} and gives away {b}. How many {what} are left?", f"{a} - {b}", a - b
    elif kind == 2:
        q, work, ans = f"{who} buys {c} boxes with {a} {what} each. How many {what} is that?", f"{c} * {a}", c * a
    else:
        q, work, ans = f"{who} shares {a * c} {what} equally among {c} friends. How many does each get?", \
            f"{a * c} / {c}", a
    return q, f"{work} = {ans}. The answer is {ans}."


def math_docs(limit: int, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(limit):
        lines = []
        for _ in range(8):
            q, a = math_problem(rng)
            lines.append(f"Question: {q}\nAnswer: {a}\n")
        docs.append("\n".join(lines))
    return docs


CORPORA = {"code": code_docs, "docs": docs_docs, "math": math_docs}


def split(docs: list[str]) -> tuple[list[str], list[str]]:
    """(training, held-out) documents."""
    train = [d for i, d in enumerate(docs) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    held = [d for i, d in enumerate(docs) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    return train, held


def build_items(part: str, per_domain: int, context_chars: int = 2400, question_chars: int = 240,
                max_docs: int = 400, seed: int = 0) -> list[Item]:
    """`part` = "calibration" or "evaluation": disjoint halves of the held-out
    documents. Code and prose items continue the document (the question is the
    next stretch of text); math items ask a new problem after worked ones."""
    if part not in ("calibration", "evaluation"):
        raise ValueError(f"part must be calibration or evaluation, got {part!r}")
    rng = random.Random(f"{part}-{seed}")
    items = []
    for domain, fn in CORPORA.items():
        _, held = split(fn(max_docs))
        docs = held[0::2] if part == "calibration" else held[1::2]
        for i in range(min(per_domain, len(docs))):
            # Consecutive documents until the item is long enough (short ones join).
            text, j = "", i
            while len(text) < context_chars + question_chars:
                text += docs[j % len(docs)] + "\n\n"
                j += 1
            if domain == "math":  # worked problems, cut at a problem boundary, then a new one
                q, a = math_problem(rng)
                context = text[:text.rindex("\n\n", 0, context_chars) + 2]
                items.append(Item(context, f"Question: {q}\nAnswer:", " " + a, domain))
            else:
                items.append(Item(text[:context_chars], text[context_chars:context_chars + question_chars],
                                  None, domain))
    return items


def load_jsonl(path: str) -> list[Item]:
    """A user calibration set: one JSON object per line with string fields
    `context` and `question` and an optional `answer`."""
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON: {e}") from None
            if not isinstance(obj, dict) or not all(isinstance(obj.get(k), str) and obj[k]
                                                    for k in ("context", "question")):
                raise ValueError(f"{path}:{n}: needs non-empty string fields context and question")
            answer = obj.get("answer")
            if answer is not None and not isinstance(answer, str):
                raise ValueError(f"{path}:{n}: answer must be a string")
            items.append(Item(obj["context"], obj["question"], answer, obj.get("domain", "")))
    if not items:
        raise ValueError(f"{path}: no items")
    return items
