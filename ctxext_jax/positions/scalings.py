"""RoPE scalings keyed by Hugging Face's `rope_type`: one frozen dataclass per type.

Each registered type (`REGISTRY`) is a `RopeScaling` subclass whose fields are the constants of
the `rope_scaling` / `rope_parameters` block of a model's config.json, with Hugging Face's key
names. `RopeScaling.from_hf` parses and checks such a block; `frequencies` returns what
transformers' `ROPE_INIT_FUNCTIONS[rope_type](config, device, seq_len)` returns for the same
config: inverse frequencies [R/2] and the attention factor that multiplies cos and sin.

The frequency arithmetic runs in float32 numpy in the same order of operations as
transformers, so thresholds (llama3's wavelength bands, YaRN's ramp) fall on the same side.
A value of None means "not set", as in Hugging Face configs.
"""

from __future__ import annotations

import abc
import dataclasses
import difflib
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from ctxext_jax.errors import fail


def _plain(rope: Any, key: str) -> dict[str, Any]:
    """A Mapping or ml_collections ConfigDict -> dict without None values."""
    if hasattr(rope, "to_dict"):
        rope = rope.to_dict()
    if not isinstance(rope, Mapping):
        fail(key, f"expected a dict of Hugging Face rope keys, got {type(rope).__name__}")
    return {k: v for k, v in rope.items() if v is not None}


def _to_float(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        fail(key, f"expected a number, got {value!r}; fix: give a float")
    if not math.isfinite(value):
        fail(key, f"expected a finite number, got {value!r}")
    return float(value)


def _to_int(value: Any, key: str) -> int:
    if _to_float(value, key) != int(value):
        fail(key, f"expected an integer, got {value!r}; fix: give a positive int")
    return int(value)


def _to_bool(value: Any, key: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        fail(key, f"expected true or false, got {value!r}")
    return bool(value)


def _to_floats(value: Any, key: str) -> tuple[float, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        fail(key, f"expected a list of numbers, got {value!r}")
    return tuple(_to_float(v, f"{key}[{i}]") for i, v in enumerate(value))


_COERCE = {"float": _to_float, "int": _to_int, "bool": _to_bool, "tuple[float, ...]": _to_floats}


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling(abc.ABC):
    """Base of the registered positional schemes; subclasses add their constants as fields."""

    rope_type: ClassVar[str]
    # True when the frequencies depend on the current sequence length (dynamic types, longrope).
    depends_on_length: ClassVar[bool] = False
    # Keys Hugging Face merges into every block that this type does not use (NoPE drops theta).
    ignored_keys: ClassVar[tuple[str, ...]] = ()

    @abc.abstractmethod
    def frequencies(
        self, head_dim: int, *, max_position_embeddings: int, seq_len: int | None = None
    ) -> tuple[np.ndarray, float]:
        """inv_freq [R/2] float32 and the attention factor, as transformers computes them."""

    @abc.abstractmethod
    def check(self, *, key: str, head_dim: int | None = None) -> None:
        """Raises ValueError naming `key.<field>` for a value out of range."""

    @classmethod
    def from_hf(
        cls,
        block: Mapping[str, Any],
        *,
        rope_theta: float | None = None,
        partial_rotary_factor: float | None = None,
        key: str = "rope",
        head_dim: int | None = None,
    ) -> RopeScaling:
        """Parses a `rope_scaling` block (older transformers: `type`, theta in the outer config,
        passed as `rope_theta=`) or a `rope_parameters` block (newer: `rope_type`, `rope_theta`).
        With head_dim, also checks what depends on it (rotary dim, longrope list lengths)."""
        values = _plain(block, key)
        type_names = {values.pop(k) for k in ("type", "rope_type") if k in values}
        if len(type_names) > 1:
            fail(f"{key}.rope_type", f"'type' and 'rope_type' disagree: {sorted(type_names)}")
        default_type = "default" if cls is RopeScaling else cls.rope_type
        rope_type = type_names.pop() if type_names else default_type
        if rope_type not in REGISTRY:
            fail(f"{key}.rope_type", f"unknown {rope_type!r}; choose one of {sorted(REGISTRY)}")
        target = REGISTRY[rope_type]
        if cls is not RopeScaling and target is not cls:
            fail(f"{key}.rope_type", f"{cls.__name__} parses {cls.rope_type!r}, got {rope_type!r}")
        if rope_theta is not None:
            values.setdefault("rope_theta", rope_theta)
        if partial_rotary_factor is not None:
            values.setdefault("partial_rotary_factor", partial_rotary_factor)
        for name in target.ignored_keys:
            values.pop(name, None)
        allowed = [f.name for f in dataclasses.fields(target)]
        # Unknown keys first: a typo ("factr") is the cause of the missing key that follows.
        for name in sorted(set(values) - set(allowed)):
            close = difflib.get_close_matches(name, allowed, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            fail(
                f"{key}.{name}",
                f"unknown key for rope_type {rope_type!r}; {hint}allowed keys: {sorted(allowed)}",
            )
        kwargs = {}
        for field in dataclasses.fields(target):
            field_key = f"{key}.{field.name}"
            if field.name in values:
                kwargs[field.name] = _COERCE[field.type.split(" |")[0]](
                    values[field.name], field_key
                )
            elif field.default is dataclasses.MISSING:
                fail(field_key, f"required for rope_type {rope_type!r}; fix: set {field_key}")
        scaling = target(**kwargs)
        scaling.check(key=key, head_dim=head_dim)
        return scaling

    def to_hf(self) -> dict[str, Any]:
        """The `rope_parameters` block with Hugging Face key names (unset fields left out)."""
        out: dict[str, Any] = {"rope_type": self.rope_type}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None:
                out[field.name] = list(value) if isinstance(value, tuple) else value
        return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class NoPE(RopeScaling):
    """No positional signal at all (Kazemnejad et al. 2023; Llama 4 global layers)."""

    rope_type: ClassVar[str] = "nope"
    ignored_keys: ClassVar[tuple[str, ...]] = ("rope_theta", "partial_rotary_factor")

    def frequencies(
        self, head_dim: int, *, max_position_embeddings: int, seq_len: int | None = None
    ) -> tuple[np.ndarray, float]:
        return np.zeros((0,), np.float32), 1.0

    def check(self, *, key: str, head_dim: int | None = None) -> None:
        """NoPE has no constants, so nothing can be out of range."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Default(RopeScaling):
    """Original RoPE (Su et al. 2021): inv_freq_i = theta^(-2i/R), R = int(head_dim * prf)."""

    rope_type: ClassVar[str] = "default"
    rope_theta: float = 10_000.0
    partial_rotary_factor: float = 1.0

    def rotary_dim(self, head_dim: int) -> int:
        return int(head_dim * self.partial_rotary_factor)

    def _exponents(self, head_dim: int) -> np.ndarray:
        dim = self.rotary_dim(head_dim)
        return np.arange(0, dim, 2).astype(np.float32) / dim

    def _base_inv_freq(self, head_dim: int, theta: float | None = None) -> np.ndarray:
        theta = self.rope_theta if theta is None else theta
        return 1.0 / (np.float32(theta) ** self._exponents(head_dim))

    def frequencies(
        self, head_dim: int, *, max_position_embeddings: int, seq_len: int | None = None
    ) -> tuple[np.ndarray, float]:
        return self._base_inv_freq(head_dim), 1.0

    def check(self, *, key: str, head_dim: int | None = None) -> None:
        if self.rope_theta <= 1.0:
            fail(f"{key}.rope_theta", f"got {self.rope_theta}, must be > 1 (e.g. 10000.0)")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            fail(
                f"{key}.partial_rotary_factor",
                f"got {self.partial_rotary_factor}, must be in (0, 1]",
            )
        if head_dim is not None:
            dim = self.rotary_dim(head_dim)
            if dim < 2 or dim % 2:
                fail(
                    f"{key}.partial_rotary_factor",
                    f"rotary dim int({head_dim} * {self.partial_rotary_factor}) = {dim} must be "
                    "even and >= 2; fix: pick a factor giving an even number of rotary dims",
                )


def _check_factor(factor: float | None, key: str) -> None:
    if factor is not None and factor < 1.0:
        fail(
            f"{key}.factor",
            f"got {factor}, must be >= 1 (it is the context-extension ratio); "
            f"fix: set {key}.factor to new_length / trained_length, e.g. 4.0",
        )


def _check_original(value: int, key: str) -> None:
    if value < 1:
        fail(f"{key}.original_max_position_embeddings", f"got {value}, must be >= 1")


def _check_attention_factor(value: float | None, key: str) -> None:
    if value is not None and value <= 0.0:
        fail(f"{key}.attention_factor", f"got {value}, must be > 0 (or unset for the default)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Linear(Default):
    """Position Interpolation (Chen et al. 2023): inv_freq / factor."""

    rope_type: ClassVar[str] = "linear"
    factor: float

    def frequencies(
        self, head_dim: int, *, max_position_embeddings: int, seq_len: int | None = None
    ) -> tuple[np.ndarray, float]:
        return self._base_inv_freq(head_dim) / self.factor, 1.0

    def check(self, *, key: str, head_dim: int | None = None) -> None:
        super().check(key=key, head_dim=head_dim)
        _check_factor(self.factor, key)


@dataclasses.dataclass(frozen=True, kw_only=True)
class NTK(Linear):
    """Static NTK-aware scaling (bloc97, 2023): theta * factor^(R/(R-2))."""

    rope_type: ClassVar[str] = "ntk"

    def frequencies(
        self, head_dim: int, *, max_position_embeddings: int, seq_len: int | None = None
    ) -> tuple[np.ndarray, float]:
        dim = self.rotary_dim(head_dim)
        theta = self.rope_theta * self.factor ** (dim / (dim - 2))
        return self._base_inv_freq(head_dim, theta), 1.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class DynamicNTK(Linear):
    """Dynamic NTK (emozilla, 2023) as transformers computes it: the base grows with
    seq_len / max_position_embeddings; at or below max_position_embeddings it is `default`."""

    rope_type: ClassVar[str] = "dynamic"
    depends_on_length: ClassVar[bool] = True

    def frequencies(
        self, head_dim: int, *, max_position_embeddings: int, seq_len: int | None = None
    ) -> tuple[np.ndarray, float]:
        dim = self.rotary_dim(head_dim)
        length = max(seq_len or max_position_embeddings, max_position_embeddings)
        ratio = self.factor * length / max_position_embeddings - (self.factor - 1)
        return self._base_inv_freq(head_dim, self.rope_theta * ratio ** (dim / (dim - 2))), 1.0


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature 0.1 * mscale * ln(s) + 1 (transformers' get_mscale)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class _YarnFields(Default):
    """Constants shared by `yarn` and `dynamic_yarn` (Peng et al. 2023)."""

    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    def _yarn(self, head_dim: int, factor: float) -> tuple[np.ndarray, float]:
        dim = self.rotary_dim(head_dim)
        theta = self.rope_theta
        attention_factor = self.attention_factor
        if attention_factor is None:
            # Truthiness as in transformers: mscale=0 falls back to the plain formula.
            if self.mscale and self.mscale_all_dim:
                attention_factor = _yarn_mscale(factor, self.mscale) / _yarn_mscale(
                    factor, self.mscale_all_dim
                )
            else:
                attention_factor = _yarn_mscale(factor)

        def correction_dim(rotations: float) -> float:
            # The dimension whose wavelength fits `rotations` times in the original length.
            length = self.original_max_position_embeddings
            return (dim * math.log(length / (rotations * 2 * math.pi))) / (2 * math.log(theta))

        low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # as transformers: avoid a zero-width ramp
        pos_freqs = np.float32(theta) ** self._exponents(head_dim)
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
        extrapolation = 1 - ramp  # 1 on fast (high-frequency) dims: keep them as trained
        inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (
            1.0 / pos_freqs
        ) * extrapolation
        return inv_freq.astype(np.float32), float(attention_factor)

    def check(self, *, key: str, head_dim: int | None = None) -> None:
        super().check(key=key, head_dim=head_dim)
        _check_original(self.original_max_position_embeddings, key)
        _check_attention_factor(self.attention_factor, key)
        if self.beta_slow <= 0:
            fail(f"{key}.beta_slow", f"got {self.beta_slow}, must be > 0 (default 1)")
        if self.beta_fast < self.beta_slow:
            fail(
                f"{key}.beta_fast",
                f"got {self.beta_fast} < beta_slow={self.beta_slow}; fix: beta_fast >= beta_slow "
                "(defaults 32 and 1)",
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Yarn(_YarnFields):
    """YaRN: NTK-by-parts ramp between interpolated and original frequencies, plus a
    temperature on the logits through cos/sin."""

    rope_type: ClassVar[str] = "yarn"
    factor: float

    def frequencies(
        self, head_dim: int, *, max_position_embeddings: int, seq_len: int | None = None
    ) -> tuple[np.ndarray, float]:
        return self._yarn(head_dim, self.factor)

    def check(self, *, key: str, head_dim: int | None = None) -> None:
        super().check(key=key, head_dim=head_dim)
        _check_factor(self.factor, key)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DynamicYarn(_YarnFields):
    """YaRN with factor = max(1, seq_len / original_max_position_embeddings) (YaRN paper, 3.3)."""

    rope_type: ClassVar[str] = "dynamic_yarn"
    depends_on_length: ClassVar[bool] = True

    def frequencies(
        self, head_dim: int, *, max_position_embeddings: int, seq_len: int | None = None
    ) -> tuple[np.ndarray, float]:
        length = seq_len or self.original_max_position_embeddings
        return self._yarn(head_dim, max(1.0, length / self.original_max_position_embeddings))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Llama3(Default):
    """Llama 3.1: long wavelengths divided by factor, short kept, a smooth band between."""

    rope_type: ClassVar[str] = "llama3"
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def frequencies(
        self, head_dim: int, *, max_position_embeddings: int, seq_len: int | None = None
    ) -> tuple[np.ndarray, float]:
        inv_freq = self._base_inv_freq(head_dim)
        old_len = self.original_max_position_embeddings
        low_freq_wavelen = old_len / self.low_freq_factor
        high_freq_wavelen = old_len / self.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / self.factor, inv_freq)
        smooth = (old_len / wavelen - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
        medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32), 1.0

    def check(self, *, key: str, head_dim: int | None = None) -> None:
        super().check(key=key, head_dim=head_dim)
        _check_factor(self.factor, key)
        _check_original(self.original_max_position_embeddings, key)
        if self.low_freq_factor <= 0:
            fail(f"{key}.low_freq_factor", f"got {self.low_freq_factor}, must be > 0 (e.g. 1.0)")
        if self.high_freq_factor <= self.low_freq_factor:
            fail(
                f"{key}.high_freq_factor",
                f"got {self.high_freq_factor}, must be > low_freq_factor={self.low_freq_factor}",
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class LongRoPE(Default):
    """LongRoPE (Ding et al. 2024; Phi-3): per-frequency rescale factors, `short_factor` up to
    original_max_position_embeddings and `long_factor` beyond it."""

    rope_type: ClassVar[str] = "longrope"
    depends_on_length: ClassVar[bool] = True
    short_factor: tuple[float, ...]
    long_factor: tuple[float, ...]
    original_max_position_embeddings: int
    factor: float | None = None
    attention_factor: float | None = None

    def frequencies(
        self, head_dim: int, *, max_position_embeddings: int, seq_len: int | None = None
    ) -> tuple[np.ndarray, float]:
        old_len = self.original_max_position_embeddings
        # Phi-3 leaves factor unset and implies it by the two lengths, as transformers does.
        factor = self.factor if self.factor is not None else max_position_embeddings / old_len
        attention_factor = self.attention_factor
        if attention_factor is None:
            attention_factor = (
                1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old_len))
            )
        long = seq_len is not None and seq_len > old_len
        ext = np.asarray(self.long_factor if long else self.short_factor, np.float32)
        inv_freq = 1.0 / (ext * np.float32(self.rope_theta) ** self._exponents(head_dim))
        return inv_freq.astype(np.float32), float(attention_factor)

    def check(self, *, key: str, head_dim: int | None = None) -> None:
        super().check(key=key, head_dim=head_dim)
        _check_factor(self.factor, key)
        _check_original(self.original_max_position_embeddings, key)
        _check_attention_factor(self.attention_factor, key)
        for name in ("short_factor", "long_factor"):
            values = getattr(self, name)
            expected = None if head_dim is None else self.rotary_dim(head_dim) // 2
            if not values or (expected is not None and len(values) != expected):
                want = "non-empty" if expected is None else f"of length rotary_dim/2 = {expected}"
                fail(f"{key}.{name}", f"has {len(values)} entries, must be {want}")
            if min(values) <= 0:
                fail(f"{key}.{name}", f"entries must be > 0, got min {min(values)}")
        if len(self.short_factor) != len(self.long_factor):
            fail(
                f"{key}.long_factor",
                f"has {len(self.long_factor)} entries but short_factor has "
                f"{len(self.short_factor)}; both are one per rotary frequency",
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Proportional(Default):
    """transformers' `proportional` (Gemma 4 global layers): the first prf*head_dim/2 frequencies
    use exponent 2i/head_dim (not 2i/R) and the rest are zero, so inv_freq spans head_dim/2 and
    the unrotated pairs are the tail of each half; all divided by factor."""

    rope_type: ClassVar[str] = "proportional"
    factor: float = 1.0

    def frequencies(
        self, head_dim: int, *, max_position_embeddings: int, seq_len: int | None = None
    ) -> tuple[np.ndarray, float]:
        rope_angles = int(self.partial_rotary_factor * head_dim // 2)
        exponents = np.arange(0, 2 * rope_angles, 2).astype(np.float32) / head_dim
        inv_freq = np.zeros((head_dim // 2,), np.float32)
        inv_freq[:rope_angles] = 1.0 / (np.float32(self.rope_theta) ** exponents)
        return inv_freq / self.factor, 1.0

    def check(self, *, key: str, head_dim: int | None = None) -> None:
        # head_dim, not the rotary dim, must be even: all of it goes through the rotation.
        Default.check(
            dataclasses.replace(self, partial_rotary_factor=1.0), key=key, head_dim=head_dim
        )
        if not 0.0 <= self.partial_rotary_factor <= 1.0:
            fail(
                f"{key}.partial_rotary_factor",
                f"got {self.partial_rotary_factor}, must be in [0, 1]",
            )
        _check_factor(self.factor, key)


REGISTRY: dict[str, type[RopeScaling]] = {
    cls.rope_type: cls
    for cls in (Default, Linear, NTK, DynamicNTK, Yarn, DynamicYarn, Llama3, LongRoPE)
    + (Proportional, NoPE)
}
