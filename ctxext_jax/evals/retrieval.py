"""Passkey retrieval (PI / LongLoRA template) and needle-in-a-haystack grids.

A prompt is assembled from separately encoded pieces, so its length is exact in tokens for any
tokenizer: `[bos] + head + filler with inserts + question` has exactly L tokens, and an insert
at depth d starts after round(d * F) of the F filler tokens (d = 0: right after the head,
d = 1: right before the question). Several inserts are placed at their own depths in order.

Scoring is exact greedy match of the answer tokens, computed by teacher forcing: the prompt
plus all answer tokens but the last go through one forward pass, and the answer counts as
retrieved iff the argmax at each answer position is the next answer token (the same verdict
greedy decoding of len(answer) tokens gives, in one forward pass). With a `generator` the
grids score by real generation instead: greedy decoding through the KV cache, the answer
retrieved iff the generated tokens begin with it (`evaluate --decode`). The answer's tokens are
those the tokenizer gives it as a continuation of the question (" 12345" after "... is").

Needle variants, all on real text from the eval split as the haystack (documents joined
without separators, read cyclically from a seeded offset per trial):
  single      one needle "The special magic number for {name} is {value}." at depth d
  multi       k needles with distinct names at depths d, d + 1/k, ... (mod 1); each is asked
              for in its own row; accuracy = fraction recalled
  distractor  the target needle at depth d and k - 1 near-duplicates "The special magic code
              for {same name} is {other value}." elsewhere; accuracy = target recalled,
              distractor_rate = the model answers with a distractor's value instead
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from ctxext_jax.evals.scoring import Scorer
from ctxext_jax.metrics import Progress

PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
    "them. I will quiz you about the important information there."
)
PASSKEY_FILLER = (
    " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
)
PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = " What is the pass key? The pass key is"

NEEDLE = " The special magic number for {name} is {value}."
DISTRACTOR = " The special magic code for {name} is {value}."
NEEDLE_QUESTION = (
    " What is the special magic number for {name}? The special magic number for {name} is"
)
NAMES = (
    "apple",
    "river",
    "falcon",
    "copper",
    "meadow",
    "violet",
    "harbor",
    "lantern",
    "glacier",
    "saffron",
    "thunder",
    "pebble",
    "orchid",
    "canyon",
    "ember",
    "willow",
    "quartz",
    "bamboo",
    "comet",
    "juniper",
)
VARIANTS = ("single", "multi", "distractor")

# generator(prompts: list of int32 [L], max_new_tokens) -> the greedy new tokens of each prompt
Generator = Callable[[list[np.ndarray], int], list[list[int]]]


@dataclasses.dataclass(frozen=True)
class Prompt:
    """tokens: int32 [L]; answers: candidate continuations, the first is the correct one;
    inserts: the (start, end) span of each insert in `tokens`, in the order they were given;
    filler: how many filler tokens the prompt holds."""

    tokens: np.ndarray
    answers: tuple[np.ndarray, ...]
    inserts: tuple[tuple[int, int], ...]
    filler: int


def _encode(tokenizer, text: str) -> np.ndarray:
    return np.asarray(tokenizer.encode(text), dtype=np.int32)


def continuation(tokenizer, prefix: str, text: str) -> np.ndarray:
    """The tokens of `text` as the tokenizer writes it right after `prefix` (falls back to
    encoding it alone when the boundary merges across the two)."""
    head, joint = _encode(tokenizer, prefix), _encode(tokenizer, prefix + text)
    if len(joint) > len(head) and np.array_equal(joint[: len(head)], head):
        return joint[len(head) :]
    return _encode(tokenizer, text)


def assemble(
    tokenizer,
    *,
    length: int,
    head: np.ndarray,
    inserts: Sequence[tuple[float, np.ndarray]],
    question: np.ndarray,
    filler: np.ndarray,
    answers: Sequence[np.ndarray],
) -> Prompt:
    """`[bos] + head + filler[:F] with inserts at their depths + question`, exactly `length`
    tokens. filler: int32 [>= F] token source, used from its start."""
    fixed = 1 + len(head) + sum(len(ids) for _, ids in inserts) + len(question)
    n_fill = length - fixed
    if n_fill < 0:
        raise ValueError(
            f"length {length} is shorter than the {fixed} tokens of the prompt template "
            f"without filler; evaluate lengths of at least {fixed} tokens."
        )
    if len(filler) < n_fill:
        raise ValueError(f"the filler has {len(filler)} tokens, {n_fill} are needed.")
    for depth, _ in inserts:
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth {depth} must be in [0, 1] (0 = start, 1 = end of the text).")
    order = sorted(range(len(inserts)), key=lambda i: inserts[i][0])
    pieces, spans = [np.asarray([tokenizer.bos_id], np.int32), head], [(0, 0)] * len(inserts)
    cursor, offset = 0, 1 + len(head)
    for i in order:
        depth, ids = inserts[i]
        cut = int(round(depth * n_fill))
        pieces.append(filler[cursor:cut])
        offset += cut - cursor
        spans[i], cursor = (offset, offset + len(ids)), cut
        pieces.append(ids)
        offset += len(ids)
    pieces += [filler[cursor:n_fill], question]
    tokens = np.concatenate(pieces).astype(np.int32)
    assert len(tokens) == length, (len(tokens), length)  # guaranteed by the arithmetic above
    return Prompt(tokens, tuple(np.asarray(a, np.int32) for a in answers), tuple(spans), n_fill)


def passkey_prompt(tokenizer, *, length: int, depth: float, key: int) -> Prompt:
    """The PI / LongLoRA passkey prompt of exactly `length` tokens; answers[0] = the key."""
    filler_ids = _encode(tokenizer, PASSKEY_FILLER)
    return assemble(
        tokenizer,
        length=length,
        head=_encode(tokenizer, PASSKEY_INTRO),
        inserts=[(depth, _encode(tokenizer, PASSKEY_NEEDLE.format(key=key)))],
        question=_encode(tokenizer, PASSKEY_QUESTION),
        filler=np.tile(filler_ids, length // max(len(filler_ids), 1) + 1),
        answers=[continuation(tokenizer, PASSKEY_QUESTION, f" {key}")],
    )


def passkey_min_length(tokenizer) -> int:
    """The shortest passkey prompt (no filler) in this tokenizer's tokens (5-digit keys)."""
    parts = (PASSKEY_INTRO, PASSKEY_NEEDLE.format(key=99999), PASSKEY_QUESTION)
    return 1 + sum(len(tokenizer.encode(p)) for p in parts)


def needle_min_length(tokenizer, *, needles: int) -> int:
    """The shortest needle prompt (no haystack) with `needles` needles, longest name."""
    name = max(NAMES, key=lambda n: len(tokenizer.encode(NEEDLE.format(name=n, value=9999999))))
    needle = len(tokenizer.encode(NEEDLE.format(name=name, value=9999999)))
    return 1 + needles * needle + len(tokenizer.encode(NEEDLE_QUESTION.format(name=name)))


def needle_prompts(
    tokenizer,
    haystack: np.ndarray,
    *,
    length: int,
    depth: float,
    variant: str,
    needles: int,
    rng: np.random.Generator,
) -> list[Prompt]:
    """The rows of one needle trial (one per asked needle), each exactly `length` tokens.

    haystack: int32 [N] text tokens, read cyclically from a random offset.
    """
    if variant not in VARIANTS:
        raise ValueError(f"needle variant {variant!r} is unknown; choose from {VARIANTS}.")
    k = 1 if variant == "single" else needles
    if not 1 <= k <= len(NAMES):
        raise ValueError(f"--needles={needles} must be in [1, {len(NAMES)}] for {variant!r}.")
    names = [NAMES[i] for i in rng.choice(len(NAMES), size=k, replace=False)]
    values = [int(v) for v in rng.choice(np.arange(1_000_000, 10_000_000), size=k, replace=False)]
    depths = [(depth + i / k) % 1.0 if i else depth for i in range(k)]
    start = int(rng.integers(len(haystack)))
    filler = haystack[(start + np.arange(length)) % len(haystack)]
    if variant == "distractor":
        templates = [NEEDLE] + [DISTRACTOR] * (k - 1)
        names = [names[0]] * k
    else:
        templates = [NEEDLE] * k
    inserts = [
        (d, _encode(tokenizer, t.format(name=n, value=v)))
        for d, t, n, v in zip(depths, templates, names, values, strict=True)
    ]
    asked = [0] if variant != "multi" else range(k)
    prompts = []
    for i in asked:
        question = NEEDLE_QUESTION.format(name=names[i])
        # Row i's answer first; in the distractor variant the distractors' values follow.
        order = [i] + ([j for j in range(k) if j != i] if variant == "distractor" else [])
        answers = [continuation(tokenizer, question, f" {values[j]}") for j in order]
        prompts.append(
            assemble(
                tokenizer,
                length=length,
                head=np.zeros(0, np.int32),
                inserts=inserts,
                question=_encode(tokenizer, question),
                filler=filler,
                answers=answers,
            )
        )
    return prompts


def exact_matches(
    scorer: Scorer,
    rows: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    pad_id: int,
    batch_tokens: int,
    progress: Progress | None = None,
    note: str = "",
) -> np.ndarray:
    """rows: (prompt [L], answer [n]) -> bool [R]: greedy decoding after the prompt reproduces
    the answer exactly (teacher-forced argmax equality at every answer position)."""
    out = np.zeros(len(rows), bool)
    # Every batch has the same shape (the longest row; the last batch padded with empty rows)
    # so the model compiles once per call; padding after a row's tokens never reaches them.
    T = max(len(p) + len(a) - 1 for p, a in rows)
    per_batch = max(1, batch_tokens // T)
    shape = (min(per_batch, len(rows)), T)
    for start in range(0, len(rows), per_batch):
        chunk = rows[start : start + per_batch]
        inputs = np.full(shape, pad_id, np.int32)
        targets = np.full(shape, pad_id, np.int32)
        for r, (prompt, answer) in enumerate(chunk):
            sequence = np.concatenate([prompt, answer])
            inputs[r, : len(sequence) - 1], targets[r, : len(sequence) - 1] = (
                sequence[:-1],
                sequence[1:],
            )
        _, correct = scorer(inputs, targets)
        for r, (prompt, answer) in enumerate(chunk):
            span = slice(len(prompt) - 1, len(prompt) + len(answer) - 1)
            out[start + r] = bool(correct[r, span].all())
        if progress is not None:
            progress.advance(sum(len(p) + len(a) - 1 for p, a in chunk), note)
    return out


def generated_matches(
    generator: Generator,
    rows: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    batch_tokens: int,
    progress: Progress | None = None,
    note: str = "",
) -> np.ndarray:
    """rows: (prompt [L], answer [n]) -> bool [R]: greedy generation after the prompt begins
    with the answer. Rows sharing a prompt (a distractor trial's target and distractors, in
    consecutive rows) generate once, as many tokens as their longest answer."""
    groups: list[list[int]] = []
    for r, (prompt, _) in enumerate(rows):
        if groups and rows[groups[-1][0]][0] is prompt:
            groups[-1].append(r)
        else:
            groups.append([r])
    new_tokens = max(len(a) for _, a in rows)
    per_batch = max(1, batch_tokens // (max(len(p) for p, _ in rows) + new_tokens))
    out = np.zeros(len(rows), bool)
    for start in range(0, len(groups), per_batch):
        chunk = groups[start : start + per_batch]
        generated = generator([rows[g[0]][0] for g in chunk], new_tokens)
        for group, tokens in zip(chunk, generated, strict=True):
            for r in group:
                answer = rows[r][1]
                out[r] = list(tokens[: len(answer)]) == answer.tolist()
        if progress is not None:
            progress.advance(sum(len(rows[r][0]) + len(rows[r][1]) - 1 for g in chunk
                                 for r in g), note)  # fmt: skip
    return out


def _matches(scorer, generator, rows, *, pad_id, batch_tokens, progress, note) -> np.ndarray:
    if generator is not None:
        return generated_matches(
            generator, rows, batch_tokens=batch_tokens, progress=progress, note=note
        )
    return exact_matches(
        scorer, rows, pad_id=pad_id, batch_tokens=batch_tokens, progress=progress, note=note
    )


def _trial_rng(seed: int, *parts: float) -> np.random.Generator:
    return np.random.default_rng([seed, *(int(round(p * 1_000_000)) for p in parts)])


def passkey_grid(
    scorer: Scorer,
    tokenizer,
    *,
    lengths: Sequence[int],
    depths: Sequence[float],
    trials: int,
    seed: int,
    batch_tokens: int,
    progress: Progress | None = None,
    generator: Generator | None = None,
) -> dict:
    """Passkey accuracy [len(lengths)][len(depths)] over `trials` seeded keys per cell, by
    teacher-forced scoring, or by real generation with a `generator`."""
    accuracy = []
    for length in lengths:
        rows = []
        for depth in depths:
            for trial in range(trials):
                key = int(_trial_rng(seed, length, depth, trial).integers(10_000, 100_000))
                prompt = passkey_prompt(tokenizer, length=length, depth=depth, key=key)
                rows.append((prompt.tokens, prompt.answers[0]))
        hits = _matches(
            scorer,
            generator,
            rows,
            pad_id=tokenizer.pad_id,
            batch_tokens=batch_tokens,
            progress=progress,
            note=f"passkey L={length}",
        )
        accuracy.append(hits.reshape(len(depths), trials).mean(axis=1).tolist())
    return {
        "lengths": list(lengths),
        "depths": list(depths),
        "trials": trials,
        "accuracy": accuracy,
    }


def needle_grid(
    scorer: Scorer,
    tokenizer,
    haystack: np.ndarray,
    *,
    lengths: Sequence[int],
    depths: Sequence[float],
    trials: int,
    variant: str,
    needles: int,
    seed: int,
    batch_tokens: int,
    progress: Progress | None = None,
    generator: Generator | None = None,
) -> dict:
    """Needle accuracy [len(lengths)][len(depths)] (and distractor_rate for 'distractor'), by
    teacher-forced scoring, or by real generation with a `generator`."""
    accuracy, distractor_rate = [], []
    for length in lengths:
        rows, owners = [], []  # owners[r] = (cell, is_target)
        for d, depth in enumerate(depths):
            for trial in range(trials):
                rng = _trial_rng(seed, length, depth, trial, VARIANTS.index(variant))
                for prompt in needle_prompts(
                    tokenizer,
                    haystack,
                    length=length,
                    depth=depth,
                    variant=variant,
                    needles=needles,
                    rng=rng,
                ):
                    for a, answer in enumerate(prompt.answers):
                        rows.append((prompt.tokens, answer))
                        owners.append((d, a == 0))
        hits = _matches(
            scorer,
            generator,
            rows,
            pad_id=tokenizer.pad_id,
            batch_tokens=batch_tokens,
            progress=progress,
            note=f"needle {variant} L={length}",
        )
        cells = np.asarray([d for d, _ in owners])
        target = np.asarray([t for _, t in owners])
        accuracy.append([float(hits[(cells == d) & target].mean()) for d in range(len(depths))])
        if variant == "distractor":
            # A row group is one trial: target first, then its distractors.
            groups = np.cumsum(target) - 1
            wrong = np.zeros(groups[-1] + 1, bool)
            np.logical_or.at(wrong, groups[~target], hits[~target])
            trial_cells = cells[target]
            distractor_rate.append(
                [float(wrong[trial_cells == d].mean()) for d in range(len(depths))]
            )
    result = {
        "lengths": list(lengths),
        "depths": list(depths),
        "trials": trials,
        "variant": variant,
        "needles": 1 if variant == "single" else needles,
        "accuracy": accuracy,
    }
    if variant == "distractor":
        result["distractor_rate"] = distractor_rate
    return result
