"""Synthetic long-range tasks (RULER-style) at the token level, shared by training and evaluation.

Every task writes facts into a haystack of filler tokens and asks for them at the end; the
model must look back over the whole distance to answer. Facts are made of *task symbols*:
token ids reserved from the top of the tokenizer's vocabulary (64 keys, 64 values and a few
markers), which the filler never contains, so an answer can only come from a fact.

  passkey   one needle `PASS v1..vm` at depth d; asked `ASK PASS` -> v1..vm
  multikey  n needles `k_i v_i1..v_im` at spread depths; asked `ASK k_j` -> v_j1..v_jm for one j
  kv        n pairs `k_1 v_1 .. k_n v_n` as one block at depth d; asked `ASK k_p1 v_p1 k_p2 ..`
            for every key in a random order (multi-query associative recall, MQAR)
  vartrack  c chains `x1 v`, `x2 x1`, `x3 x2`, ... (hops facts each, at spread depths in order);
            asked `ASK x_last` -> v for every chain (variable tracking)
  copy      a run `s1..sm` of m = 2n distinct value symbols at depth d; asked `ASK s1` -> s2..sm
            (copying: every answer token is an induction step, m - 1 of them per instance, so
            it trains the copy circuit that retrieval needs with dense supervision)
  textcopy  as copy, with a run of m ordinary tokens from the filler's source (corpus text, or
            random non-symbol tokens) instead of value symbols: copying text, the induction
            that a repeated passage needs to be predicted from its first occurrence

The number of facts is fixed and the filler grows with the length: at the base length the
task is already long-range (the facts sit up to ~L tokens back), and longer contexts only
add distance, not difficulty. An instance is exactly `length` tokens, answers included.

Training and evaluation never share an instance stream: training draws instance i from
`default_rng([seed, 0, i])`, evaluation from `default_rng([seed, 1, i])` (validation loss) and
`default_rng([seed, 1, length, depth, trial])` (accuracy grids),
and multi-token values (passkey, multikey) are split between the two by a hash, so no
evaluation passkey was ever seen in training. The filler comes from the corpus split of the
same side (train text for training, held-out text for evaluation), or is random symbols.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Sequence

import numpy as np

TASKS = ("passkey", "multikey", "kv", "vartrack", "copy", "textcopy")
_TRAIN, _EVAL = 0, 1
_MARKERS = ("ASK", "PASS")


@dataclasses.dataclass(frozen=True)
class TaskVocab:
    """The reserved task symbols: keys [K], values [V] and markers, as token ids."""

    keys: np.ndarray
    values: np.ndarray
    ask: int
    passkey: int

    @property
    def reserved(self) -> np.ndarray:
        return np.concatenate([self.keys, self.values, [self.ask, self.passkey]]).astype(np.int32)

    @classmethod
    def for_tokenizer(cls, tokenizer, *, keys: int = 64, values: int = 64) -> TaskVocab:
        """The top `keys + values + 2` ids of the tokenizer's vocabulary (specials skipped);
        for the byte tokenizer these are the bytes 0x7c..0xff, rare in source code and text."""
        specials = {int(tokenizer.bos_id), int(tokenizer.eos_id), int(tokenizer.pad_id)}
        need = keys + values + len(_MARKERS)
        ids = [i for i in range(int(tokenizer.vocab_size) - 1, -1, -1) if i not in specials]
        if len(ids) < need + 16:
            raise ValueError(
                f"data.task: the tokenizer has {tokenizer.vocab_size} ids; the tasks reserve "
                f"{need} of them and need filler besides; lower data.task.keys / values."
            )
        ids = np.asarray(ids[:need][::-1], np.int32)
        return cls(ids[:keys], ids[keys : keys + values], int(ids[-2]), int(ids[-1]))


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """The knobs of every task (`data.task` in the run config).

    facts: pairs (kv), needles (multikey) or chains (vartrack); copy runs 2 x facts symbols.
    value_len: value tokens of a passkey / multikey needle.
    hops: facts per vartrack chain.
    filler: "text" (corpus tokens with the task symbols removed) or "random" (uniform
      non-symbol tokens).
    min_length: shortest training instance; training lengths are log-uniform in
      [min_length, seq_len] (0: the shortest instance that holds the facts).
    keys / values: reserved symbols (see TaskVocab).
    """

    facts: int = 8
    value_len: int = 5
    hops: int = 3
    filler: str = "text"
    min_length: int = 0
    keys: int = 64
    values: int = 64

    def __post_init__(self):
        for name in ("facts", "value_len", "hops", "keys", "values", "min_length"):
            value = getattr(self, name)
            low = 0 if name == "min_length" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"data.task.{name}={value!r} must be an integer >= {low}.")
        if self.filler not in ("text", "random"):
            raise ValueError(f"data.task.filler={self.filler!r}: choose 'text' or 'random'.")
        if self.facts > self.keys:
            raise ValueError(
                f"data.task.facts={self.facts} needs as many distinct keys; raise data.task.keys."
            )

    @classmethod
    def from_config(cls, cfg) -> TaskConfig:
        values = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"data.task: unknown keys {sorted(unknown)}; known: {sorted(names)}.")
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class Instance:
    """tokens: int32 [L]; answer_spans: (start, end) of each asked answer in `tokens`;
    depth: where the facts sit in the filler (0 start, 1 end; the first fact for spread
    tasks)."""

    tokens: np.ndarray
    answer_spans: tuple[tuple[int, int], ...]
    depth: float

    def target_mask(self) -> np.ndarray:
        """float32 [L - 1]: 1 where targets (tokens[1:]) are answer tokens."""
        mask = np.zeros(len(self.tokens), np.float32)
        for start, end in self.answer_spans:
            mask[start:end] = 1.0
        return mask[1:]


def _filler(rng, haystack, vocab: TaskVocab, n: int, kind: str, vocab_size: int) -> np.ndarray:
    if n <= 0:
        return np.zeros(0, np.int32)
    if kind == "random" or haystack is None or len(haystack) == 0:
        low = int(vocab.reserved.min())  # below the reserved block: ordinary tokens
        return rng.integers(3, max(low, 4), size=n).astype(np.int32)
    start = int(rng.integers(len(haystack)))
    return haystack[(start + np.arange(n)) % len(haystack)]


def clean_haystack(tokens: np.ndarray, vocab: TaskVocab, specials: Sequence[int]) -> np.ndarray:
    """Corpus tokens without task symbols and document markers (bos / eos / pad)."""
    drop = np.concatenate([vocab.reserved, np.asarray(specials, np.int32)])
    return tokens[~np.isin(tokens, drop)].astype(np.int32)


def _held_out(value: np.ndarray) -> bool:
    """1 in 8 multi-token values belongs to evaluation, by a hash of its tokens."""
    return hashlib.sha256(np.asarray(value, np.int32).tobytes()).digest()[0] % 8 == 0


def _values(rng, vocab: TaskVocab, count: int, size: int, side: int) -> list[np.ndarray]:
    """`count` value sequences of `size` tokens, from this side's share (train / eval)."""
    out = []
    while len(out) < count:
        value = rng.choice(vocab.values, size=size).astype(np.int32)
        if size == 1 or _held_out(value) == (side == _EVAL):
            out.append(value)
    return out


def _layout(facts: list[np.ndarray], depths: list[float], question: list[np.ndarray],
            answers: list[np.ndarray], filler: np.ndarray, bos: int, length: int):  # fmt: skip
    """[bos] + filler with facts at their depths + question/answer pairs; exactly `length`."""
    n_fill = len(filler)
    pieces, cursor = [np.asarray([bos], np.int32)], 0
    for depth, fact in sorted(zip(depths, facts, strict=True), key=lambda p: p[0]):
        cut = max(cursor, int(round(depth * n_fill)))
        pieces += [filler[cursor:cut], fact]
        cursor = cut
    pieces.append(filler[cursor:])
    spans, offset = [], sum(len(p) for p in pieces)
    for q, a in zip(question, answers, strict=True):
        pieces += [q, a]
        offset += len(q)
        spans.append((offset, offset + len(a)))
        offset += len(a)
    tokens = np.concatenate(pieces).astype(np.int32)
    assert len(tokens) == length, (len(tokens), length)
    return tokens, tuple(spans)


def _parts(task: str, cfg: TaskConfig, vocab: TaskVocab, rng, side: int,
           text: Callable[[int], np.ndarray]):  # fmt: skip
    """(facts, relative depth offsets, questions, answers) of one instance, before filler;
    `text(n)` draws n ordinary tokens from the filler's source."""
    ask = np.asarray([vocab.ask], np.int32)
    if task == "passkey":
        value = _values(rng, vocab, 1, cfg.value_len, side)[0]
        mark = np.asarray([vocab.passkey], np.int32)
        return [np.concatenate([mark, value])], [0.0], [np.concatenate([ask, mark])], [value]
    keys = rng.choice(vocab.keys, size=cfg.facts, replace=False).astype(np.int32)
    if task == "multikey":
        values = _values(rng, vocab, cfg.facts, cfg.value_len, side)
        pairs = zip(keys, values, strict=True)
        facts = [np.concatenate([[k], v]).astype(np.int32) for k, v in pairs]
        j = int(rng.integers(cfg.facts))
        offsets = [i / cfg.facts for i in range(cfg.facts)]
        return facts, offsets, [np.asarray([vocab.ask, keys[j]], np.int32)], [values[j]]
    if task == "kv":
        values = rng.choice(vocab.values, size=cfg.facts).astype(np.int32)
        block = np.stack([keys, values], axis=1).reshape(-1)
        order = rng.permutation(cfg.facts)
        questions = [np.asarray([keys[i]], np.int32) for i in order]
        questions[0] = np.concatenate([ask, questions[0]])
        return [block], [0.0], questions, [np.asarray([values[i]], np.int32) for i in order]
    if task == "vartrack":
        chains, hops = cfg.facts, cfg.hops
        names = rng.choice(vocab.keys, size=(chains, hops), replace=False)
        values = rng.choice(vocab.values, size=chains).astype(np.int32)
        facts, offsets = [], []
        for h in range(hops):  # hop h of every chain, chains interleaved, in order of hops
            for c in range(chains):
                source = values[c] if h == 0 else names[c, h - 1]
                facts.append(np.asarray([names[c, h], source], np.int32))
                offsets.append((h * chains + c) / (hops * chains))
        asked = rng.permutation(chains)
        questions = [np.asarray([vocab.ask, names[c, -1]], np.int32) for c in asked]
        return facts, offsets, questions, [np.asarray([values[c]], np.int32) for c in asked]
    if task in ("copy", "textcopy"):
        if task == "textcopy":
            run = np.asarray(text(2 * cfg.facts), np.int32)
        elif 2 * cfg.facts > len(vocab.values):
            raise ValueError(f"data.task: copy runs 2 x facts = {2 * cfg.facts} distinct values; "
                             f"raise data.task.values above {len(vocab.values)}.")  # fmt: skip
        else:
            run = rng.choice(vocab.values, size=2 * cfg.facts, replace=False).astype(np.int32)
        return [run], [0.0], [np.asarray([vocab.ask, run[0]], np.int32)], [run[1:]]
    raise ValueError(f"data.task: unknown task {task!r}; choose from {TASKS}.")


def min_length(task: str, cfg: TaskConfig) -> int:
    """Tokens of an instance without filler (bos + facts + questions + answers)."""
    if task == "passkey":
        return 1 + (1 + cfg.value_len) + 2 + cfg.value_len
    if task == "multikey":
        return 1 + cfg.facts * (1 + cfg.value_len) + 2 + cfg.value_len
    if task == "kv":
        return 1 + 2 * cfg.facts + 1 + 2 * cfg.facts
    if task == "vartrack":
        return 1 + 2 * cfg.facts * cfg.hops + 3 * cfg.facts
    if task in ("copy", "textcopy"):
        return 1 + 2 * cfg.facts + 2 + 2 * cfg.facts - 1
    raise ValueError(f"data.task: unknown task {task!r}; choose from {TASKS}.")


def make_instance(task: str, cfg: TaskConfig, vocab: TaskVocab, rng: np.random.Generator, *,
                  length: int, depth: float, side: int, haystack: np.ndarray | None,
                  bos: int, vocab_size: int) -> Instance:  # fmt: skip
    """One instance of exactly `length` tokens with its facts at `depth` (spread tasks: the
    facts occupy [depth * (1 - spread), ...] so that all of them fit before the end)."""
    need = min_length(task, cfg)
    if length < need:
        raise ValueError(
            f"task {task!r} needs at least {need} tokens (its facts and questions); got "
            f"length {length}. Use longer lengths or fewer data.task.facts."
        )

    def text(n: int) -> np.ndarray:
        return _filler(rng, haystack, vocab, n, cfg.filler, vocab_size)

    facts, offsets, questions, answers = _parts(task, cfg, vocab, rng, side, text)
    spread = max(offsets)
    depths = [depth * (1.0 - spread) + o for o in offsets]
    filler = text(length - need)
    tokens, spans = _layout(facts, depths, questions, answers, filler, bos, length)
    return Instance(tokens, spans, float(depth))


class TaskSource:
    """Random-access instances of one task for the packed stream: `source(i)` -> a piece
    {inputs, targets, loss_mask} (int32 / float32 [n]) with n log-uniform in [min_length, seq_len],
    facts at a uniform depth; loss only on answer tokens. `evaluation` draws from the held-out
    stream. Picklable, so Grain workers can build instances themselves."""

    def __init__(self, task: str, cfg: TaskConfig, tokenizer, *, seq_len: int, seed: int,
                 haystack: np.ndarray | None, evaluation: bool = False):  # fmt: skip
        self.task, self.cfg, self.seq_len, self.seed = task, cfg, seq_len, seed
        self.side = _EVAL if evaluation else _TRAIN
        self.vocab = TaskVocab.for_tokenizer(tokenizer, keys=cfg.keys, values=cfg.values)
        self.bos, self.vocab_size = int(tokenizer.bos_id), int(tokenizer.vocab_size)
        self.shortest = max(min_length(task, cfg), cfg.min_length)
        if self.shortest > seq_len + 1:
            raise ValueError(
                f"task {task!r}: instances need {self.shortest} tokens but data.seq_len is "
                f"{seq_len}; raise seq_len or lower data.task.facts / min_length."
            )
        self.haystack = haystack

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.side, int(index)])
        # Log-uniform lengths: many short instances (dense answers, quick to learn from) and
        # some as long as the row (the longest distances). inputs <= seq_len.
        low, high = np.log(self.shortest), np.log(self.seq_len + 1)
        # exp(log(n)) can round to just under n: clamp to the shortest instance.
        length = min(max(int(np.exp(rng.uniform(low, high))), self.shortest), self.seq_len + 1)
        instance = make_instance(
            self.task, self.cfg, self.vocab, rng, length=length, depth=float(rng.uniform()),
            side=self.side, haystack=self.haystack, bos=self.bos, vocab_size=self.vocab_size,
        )  # fmt: skip
        tokens = instance.tokens
        return {"inputs": tokens[:-1], "targets": tokens[1:], "loss_mask": instance.target_mask()}


def eval_instances(task: str, cfg: TaskConfig, vocab: TaskVocab, *, length: int,
                   depths: Sequence[float], trials: int, seed: int, haystack: np.ndarray | None,
                   bos: int, vocab_size: int) -> list[Instance]:  # fmt: skip
    """`trials` held-out instances per depth, exactly `length` tokens each, in depth order."""
    return [
        make_instance(
            task,
            cfg,
            vocab,
            np.random.default_rng([seed, _EVAL, length, int(round(depth * 1e6)), trial]),
            length=length,
            depth=depth,
            side=_EVAL,
            haystack=haystack,
            bos=bos,
            vocab_size=vocab_size,
        )  # fmt: skip
        for depth in depths
        for trial in range(trials)
    ]


def score_instances(scorer: Callable, instances: Sequence[Instance], *, pad_id: int,
                    batch_tokens: int = 16384) -> np.ndarray:  # fmt: skip
    """-> bool [len(instances), questions]: each answer reproduced exactly by greedy decoding
    (teacher-forced argmax equality at every answer token, as `evals.retrieval` scores)."""
    length = max(len(i.tokens) for i in instances)
    # Always `batch_tokens // (length - 1)` rows, padded: the shape perplexity uses at the
    # same window length, so one compilation serves both.
    per_batch = max(1, batch_tokens // (length - 1))
    shape = (per_batch, length - 1)
    out = []
    for start in range(0, len(instances), per_batch):
        chunk = instances[start : start + per_batch]
        inputs = np.full(shape, pad_id, np.int32)
        targets = np.full(shape, pad_id, np.int32)
        for r, instance in enumerate(chunk):
            n = len(instance.tokens) - 1
            inputs[r, :n], targets[r, :n] = instance.tokens[:-1], instance.tokens[1:]
        _, correct = scorer(inputs, targets)
        for r, instance in enumerate(chunk):
            # Answer token t is predicted at position t - 1.
            out.append([bool(correct[r, s - 1 : e - 1].all()) for s, e in instance.answer_spans])
    return np.asarray(out, bool)
