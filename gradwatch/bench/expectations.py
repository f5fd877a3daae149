"""What the benchmark expects of a remedy: categories, and the keyword rule that places a remedy in one.

A case declares the category of the fix that addresses its cause (``"inputs"``, ``"learning_rate"``,
``"init"``, ...). The benchmark reads the first remedy of the first alert of the expected kind
(``Alert.remedies[0]``) and places it in a category by this rule:

    **the category whose keyword occurs earliest in the remedy's text** (case-insensitive regular
    expressions below; ties go to the category listed first).

The keywords are the natural words of each fix ("normalise the inputs", "learning rate", "He init",
"zero_grad", ...), so a remedy is classified by what it tells the user to do first. A remedy that
leads with its evidence should keep category words out of the evidence, or put the fix first:
"Lower the learning rate: SGD lr 3.0 moved `1` by 40% of its weights" (``learning_rate``), not
"`1` was initialised ... lower the learning rate" (``init``). A remedy matching no keyword has no
category (``None``) and never counts as correct.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["CATEGORIES", "Category", "check_categories", "classify_remedy"]


@dataclass(frozen=True)
class Category:
    """A family of fixes and the keywords that name it.

    Attributes:
        name: the category (``Case.remedy`` names these).
        meaning: what the fix changes, in words.
        patterns: regular expressions (case-insensitive) whose match places a remedy here.
        examples: remedies that fall here.
    """

    name: str
    meaning: str
    patterns: tuple[str, ...]
    examples: tuple[str, ...]

    def first_match(self, text: str) -> int | None:
        """Offset of the earliest keyword of this category in ``text`` (``None``: no keyword)."""
        hits = [m.start() for p in self._compiled for m in [p.search(text)] if m is not None]
        return min(hits) if hits else None

    @property
    def _compiled(self) -> tuple[re.Pattern[str], ...]:
        return tuple(re.compile(p, re.IGNORECASE) for p in self.patterns)


_CATEGORIES = (
    Category(
        "inputs",
        "the data reaching the model: input/target scale, outliers, corrupted batches",
        (
            r"\b(normali[sz]e|standardi[sz]e|rescale|scale)\s+(the\s+|your\s+|its\s+)?(raw\s+)?"
            r"(model'?s\s+)?(inputs?|targets?|regression targets?|features|pixels?)\b",
            r"\binputs?(\s+data)?\s+(scale|range|normali[sz]ation|standardi[sz]ation|statistics)\b",
            r"\binput\s+features?\s+to\s+unit\b",
            r"\boutliers?\b",
            r"\bcorrupt(ed)?\b",
        ),
        (
            "Normalise the inputs to zero mean and unit variance: `0` receives inputs of RMS 58.",
            "Look at the batch of that step for outliers or corrupted labels.",
        ),
    ),
    Category(
        "learning_rate",
        "the optimizer's step size or its schedule",
        (r"\blearning[- ]rates?\b", r"\bwarm-?ups?\b"),
        ("Lower the learning rate: SGD lr 3.0 moved `1` by 40% of its weights in one step.",),
    ),
    Category(
        "batch_size",
        "the number of samples per optimizer step",
        (r"\bbatch[- ]sizes?\b", r"\b(larger|bigger)\s+batch(es)?\b"),
        ("Raise the batch size: with 1 sample per step the gradient's noise is as large as its mean.",),
    ),
    Category(
        "init",
        "the initial weights (scheme, scale, biases)",
        (
            r"\binit(iali[sz]e[sd]?|iali[sz]ation|iali[sz]ing)?\b",
            r"\bkaiming",
            r"\bxavier",
            r"\bglorot",
            r"\borthogonal_",
            r"\bcalculate_gain\b",
        ),
        (
            "Initialise `0`, `2` with He init (nn.init.kaiming_normal_(w, nonlinearity='relu')): their weight std "
            "is 3x the He value.",
            "Never initialise weights to zero: `0` is all zeros.",
        ),
    ),
    Category(
        "architecture",
        "the model's layers: activations, normalisation layers, residual paths, recurrent cells, attention scale",
        (
            r"\breplace\b",
            r"\bresidual\b",
            r"\bskip[- ]connections?\b",
            r"\badd\s+(a\s+)?(normali[sz]ation|batchnorm|layernorm|nn\.batchnorm|nn\.layernorm)",
            r"\bforget[- ]gate\b",
            r"\bshorten\b",
            r"\b1\s*/\s*(math\.)?sqrt\b",
            r"1/√",
            r"\b(attention|dot[- ]product)\s+scores?\b",
            r"\bscaled_dot_product_attention\b",
        ),
        (
            "Replace the sigmoid activations `1`, `3` with nn.ReLU or nn.LeakyReLU (with He init).",
            "Add residual connections (x + f(x)) around blocks of the 32-layer plain stack.",
            "Scale the attention scores by 1/sqrt(d_k) = 1/8 before the softmax.",
        ),
    ),
    Category(
        "clipping",
        "bounding the gradient (gw.clip.Norm, ZScore, AGC)",
        (r"\bclip(ping|ped)?\b",),
        ("Clip gradients: gw.clip.Norm(max_norm=2.4), or gw.clip.ZScore() to clip only outliers.",),
    ),
    Category(
        "numerics",
        "floating-point range and stable operations: overflow, log(0), division by ~0, float16",
        (
            r"\b(b?float16|fp16|bf16)\b",
            r"\bGradScaler\b",
            r"\bautocast\b",
            r"\boverflows?\b",
            r"\blog\(0\)",
            r"\bdivision by\b",
            r"\blog_softmax\b",
            r"\blogsumexp\b",
            r"\bBCEWithLogitsLoss\b",
            r"\bnumerically\b",
            r"\bsqrt of\b",
            r"\beps(ilon)?\b",
        ),
        (
            "Find the operation that overflows: log(0), division by ~0, sqrt of a negative.",
            "Under float16 use torch.amp.GradScaler, or train in bfloat16.",
        ),
    ),
    Category(
        "zero_grad",
        "clearing gradients between optimizer steps",
        (r"\bzero_grad\b",),
        ("Call optimizer.zero_grad() before each backward: `fc` carries 7 steps of gradients.",),
    ),
    Category(
        "unused_layer",
        "a parameter the loss never reaches: a module unused in forward, a detach(), a no_grad() block",
        (
            r"\bnever\s+(used|called|reached|reaches|contributes)\b",
            r"\bunused\b",
            r"\bnot\s+used\s+in\b",
            r"\bdetach",
            r"\bno_grad\b",
            r"\b(does\s+not|doesn't|never)\s+reach",
        ),
        ("`head` is never used in forward: call it, or remove it from the model and the optimizer.",),
    ),
    Category(
        "frozen",
        "what is trainable and optimised: requires_grad flags and the optimizer's parameter list",
        (
            r"\brequires_grad\b",
            r"\bfrozen\b",
            r"\bunfreeze\b",
            r"\boptimi[sz]er'?s\s+param",
            r"\bparam(eter)?\s+groups?\b",
        ),
        ("`head` has requires_grad=False but is the only thing the optimizer updates: unfreeze it.",),
    ),
    Category(
        "distributed",
        "data-parallel consistency: the DDP wrapper's forward, no_sync, fully_shard, every rank taking the same "
        "steps from the same weights",
        (
            r"\bDistributedDataParallel\b",
            r"\bno_sync\b",
            r"\bfully_shard\b",
            r"\bevery rank\b",
            r"\bbroadcast\b",
        ),
        (
            "Run the forward pass through the DistributedDataParallel wrapper (ddp(x)), never ddp.module(x).",
            "Make every rank take every optimizer step: agree skip decisions across ranks first.",
        ),
    ),
)

#: The remedy categories by name, in tie-break order.
CATEGORIES: dict[str, Category] = {c.name: c for c in _CATEGORIES}


def classify_remedy(text: str) -> str | None:
    """The category of a remedy: the one whose keyword occurs earliest in ``text``.

    Args:
        text: one remedy (``Alert.remedies[0]``).

    Returns:
        The category name, or ``None`` when no keyword occurs.

    Example::

        classify_remedy("Lower the learning rate: SGD lr 3.0 moved `1` by 40% of its weights")  # "learning_rate"
    """
    best: tuple[int, int, str] | None = None
    for rank, c in enumerate(_CATEGORIES):
        at = c.first_match(text)
        if at is not None and (best is None or (at, rank) < best[:2]):
            best = (at, rank, c.name)
    return None if best is None else best[2]


def check_categories(names: tuple[str, ...], *, case: str) -> tuple[str, ...]:
    """Validate a case's accepted remedy categories.

    Raises:
        ValueError: an unknown category (the message names the case and lists the categories).
    """
    for n in names:
        if n not in CATEGORIES:
            raise ValueError(
                f"case {case!r}: remedy category {n!r} is unknown; allowed: {', '.join(CATEGORIES)}"
            )
    return names
