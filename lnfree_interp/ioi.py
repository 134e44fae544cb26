"""Indirect-object-identification prompt pairs (Wang et al. 2022), the task the paper patches.

A clean prompt names two people and repeats the subject (S); the model should complete with the
indirect object (IO):

    BABA: "When Mary and John went to the store, John gave a drink to"  -> " Mary" (IO), not " John" (S)
    ABBA: "When John and Mary went to the store, John gave a drink to"  -> " Mary"

The corrupted prompt differs only in the subject's second mention, replaced by a third name (the
usual "ABC" corruption), so the two prompts have the same number of tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from .errors import LNFreeError

TEMPLATES = (
    "When{A} and{B} went to the store,{S} gave a drink to",
    "When{A} and{B} went to the park,{S} gave a ring to",
    "Then,{A} and{B} had a long argument, and afterwards{S} said to",
    "After{A} and{B} went to the market,{S} handed a letter to",
    "While{A} and{B} were working at the house,{S} gave a book to",
)
#: candidate names, modern and Shakespearean; the ones that are one token (with a leading space)
#: in the model's tokenizer are used
NAMES = (
    "Mary", "John", "Tom", "James", "Dan", "Sid", "Martha", "Amy", "Kate", "Paul", "Anne", "Mark",
    "Romeo", "Juliet", "Henry", "Richard", "Edward", "Lucio", "Angelo", "Claudio", "Isabella", "Lucentio",
    "Petruchio", "Katharina", "Hortensio", "Tranio", "Gremio", "Bianca", "Warwick", "York", "Clarence",
    "Gloucester", "Buckingham", "Elizabeth", "Margaret", "Hastings", "Brutus", "Caesar", "Antonio",
)


@dataclass(frozen=True)
class IOIPrompts:
    """Prompt pairs for `attribution_patching` / `activation_patching`.

    ``answers``/``wrongs`` are the IO / S names with a leading space (single tokens); ``answer_ids``
    and ``wrong_ids`` their token ids; ``templates`` "BABA" or "ABBA" per prompt.
    """

    clean: list[str]
    corrupted: list[str]
    answers: list[str]
    wrongs: list[str]
    answer_ids: list[int]
    wrong_ids: list[int]
    templates: list[str]

    def __len__(self) -> int:
        return len(self.clean)


def single_token_names(tokenizer: Any, names: tuple[str, ...] | list[str] = NAMES) -> list[str]:
    """The names that are one token with a leading space (``" Mary"``) in ``tokenizer``."""
    return [n for n in names if len(tokenizer(" " + n, add_special_tokens=False)["input_ids"]) == 1]


def ioi_prompts(
    tokenizer_or_model: Any,
    n: int = 8,
    *,
    names: list[str] | None = None,
    templates: tuple[str, ...] = TEMPLATES,
    seed: int = 0,
) -> IOIPrompts:
    """``n`` IOI prompt pairs, alternating BABA and ABBA, with names that are single tokens.

    Args:
        tokenizer_or_model: a tokenizer, or any loaded model with one.
        n: number of prompt pairs.
        names: candidate names (default `NAMES`); those that are not one token (with a leading
            space) in the tokenizer are skipped.
        templates: format strings with ``{A}``, ``{B}``, ``{S}`` (each filled with ``" Name"``).
        seed: for the choice of names and templates.

    Returns:
        `IOIPrompts`: clean and corrupted prompts of equal token length, answers (IO) and
        wrong answers (S) as strings and ids.

    Raises:
        LNFreeError: no tokenizer; fewer than three distinct single-token names (lists the rejected
            ones); ``n < 1``; a template with another placeholder, or whose clean and corrupted
            prompts tokenize to different lengths.
    """
    from .inputs import get_tokenizer

    tok = get_tokenizer(tokenizer_or_model) or tokenizer_or_model
    if not callable(tok):
        raise LNFreeError("ioi_prompts needs a tokenizer (or a model that has one).")
    if int(n) < 1:
        raise LNFreeError(f"n={n}: ask for at least one prompt pair.")
    if names is not None and len(names) == 0:
        raise LNFreeError("names=[] is empty; pass at least three names, or leave names out for the defaults.")
    for template in templates:
        try:
            template.format(A=" A", B=" B", S=" S")
        except (KeyError, IndexError, ValueError) as err:
            raise LNFreeError(f"Template {template!r} has a placeholder other than {{A}}, {{B}}, {{S}} ({err!r}).") \
                from None
    candidates = list(dict.fromkeys(names or NAMES))  # distinct: IO, S and the corrupting name must differ
    usable = single_token_names(tok, candidates)
    if len(usable) < 3:
        rejected = [n for n in candidates if n not in usable]
        raise LNFreeError(f"Only {len(usable)} of the names are single tokens in this tokenizer ({usable}); IOI "
                          f"needs 3. Rejected: {rejected[:12]}. Pass names=[...] that are one token with a "
                          "leading space.")
    rng = random.Random(seed)
    out: dict[str, list] = {k: [] for k in ("clean", "corrupted", "answers", "wrongs", "templates")}
    for i in range(n):
        io, s, c = rng.sample(usable, 3)
        template = templates[rng.randrange(len(templates))]
        kind = "BABA" if i % 2 == 0 else "ABBA"
        first, second = (io, s) if kind == "BABA" else (s, io)
        fill = lambda subj: template.format(A=" " + first, B=" " + second, S=" " + subj)  # noqa: E731
        clean, corrupted = fill(s), fill(c)
        lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in (clean, corrupted)]
        if lengths[0] != lengths[1]:
            raise LNFreeError(f"Template {template!r} tokenizes {clean!r} and {corrupted!r} to {lengths[0]} and "
                              f"{lengths[1]} tokens (a name merges with the text after it); put a space or "
                              "punctuation after each placeholder.")
        out["clean"].append(clean)
        out["corrupted"].append(corrupted)
        out["answers"].append(" " + io)
        out["wrongs"].append(" " + s)
        out["templates"].append(kind)
    ids = lambda words: [tok(w, add_special_tokens=False)["input_ids"][0] for w in words]  # noqa: E731
    return IOIPrompts(out["clean"], out["corrupted"], out["answers"], out["wrongs"], ids(out["answers"]),
                      ids(out["wrongs"]), out["templates"])
