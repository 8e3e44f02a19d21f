"""RoPE scalings against transformers (the pinned reference) and independent formulas."""

import math

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
from transformers.models.phi.modeling_phi import PhiRotaryEmbedding

from ctxext_jax.positions import (
    REGISTRY,
    RopeScaling,
    apply_rope,
    parse_rope,
    rope_frequencies,
    rope_from_hf_config,
    validate_rope,
)

transformers.logging.set_verbosity_error()  # its validators warn about the grid's corner cases


def _rng():
    seed = np.random.SeedSequence().entropy
    return np.random.default_rng(seed), seed


def _hf_config(rope, head_dim, max_pos):
    return transformers.LlamaConfig(
        hidden_size=head_dim * 4,
        num_attention_heads=4,
        head_dim=head_dim,
        max_position_embeddings=max_pos,
        rope_parameters=dict(rope),
    )


def _hf_frequencies(rope, head_dim, max_pos, seq_len=None):
    config = _hf_config(rope, head_dim, max_pos)
    if config.rope_parameters["rope_type"] == "default":
        # Phi's default honours partial_rotary_factor (Llama's ignores it).
        inv_freq, factor = PhiRotaryEmbedding.compute_default_rope_parameters(config)
    else:
        rope_type = config.rope_parameters["rope_type"]
        inv_freq, factor = ROPE_INIT_FUNCTIONS[rope_type](config, None, seq_len)
    return inv_freq.numpy(), factor


def _grid_ropes(rope_type, *, factor, orig, rotary_half, rng):
    """The HF-style dicts tried for one rope_type at one grid point."""
    if rope_type == "default":
        return [{}]
    if rope_type in ("linear", "dynamic", "proportional"):
        return [{"factor": factor}]
    if rope_type == "yarn":
        base = {"factor": factor, "original_max_position_embeddings": orig}
        return [
            base,
            dict(base, truncate=False, beta_fast=16.0, beta_slow=2.0),
            dict(base, mscale=0.707, mscale_all_dim=1.0),
            dict(base, mscale=1.0, mscale_all_dim=0.0),  # falsy mscale_all_dim: plain formula
            dict(base, attention_factor=1.25),
        ]
    if rope_type == "llama3":
        return [
            {
                "factor": factor,
                "low_freq_factor": low,
                "high_freq_factor": high,
                "original_max_position_embeddings": orig,
            }
            for low, high in ((1.0, 4.0), (2.0, 8.0))
        ]
    assert rope_type == "longrope"
    lists = {
        "short_factor": list(rng.uniform(1.0, 2.0, rotary_half)),
        "long_factor": list(rng.uniform(1.0, 40.0, rotary_half)),
        "original_max_position_embeddings": orig,
    }
    return [lists, dict(lists, factor=factor), dict(lists, attention_factor=1.1)]


@pytest.mark.parametrize(
    "rope_type", ["default", "linear", "dynamic", "yarn", "llama3", "longrope", "proportional"]
)
def test_frequencies_match_transformers(rope_type):
    rng, seed = _rng()
    checked = 0
    for head_dim in (64, 96, 128):
        for theta in (1e4, 5e5, 1e6):
            for factor in (2.0, 4.0, 8.0, 16.5):
                orig = int(rng.choice([2048, 4096, 8192]))
                max_pos = orig * int(rng.choice([1, 2, 4]))
                prf = float(rng.choice([1.0, 0.5, 0.25]))
                rotary_half = int(head_dim * prf) // 2
                for extra in _grid_ropes(
                    rope_type, factor=factor, orig=orig, rotary_half=rotary_half, rng=rng
                ):
                    rope = dict(extra, rope_type=rope_type, rope_theta=theta)
                    rope["partial_rotary_factor"] = prf
                    for seq_len in (None, orig // 2, orig, orig + 1, 3 * max_pos + 5):
                        ours, ours_factor = rope_frequencies(
                            rope, head_dim, max_position_embeddings=max_pos, seq_len=seq_len
                        )
                        ref, ref_factor = _hf_frequencies(rope, head_dim, max_pos, seq_len)
                        where = f"{rope} head_dim={head_dim} seq_len={seq_len} seed={seed}"
                        assert ours.dtype == np.float32 and ours.shape == ref.shape, where
                        np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=0, err_msg=where)
                        assert ours_factor == pytest.approx(ref_factor, rel=1e-7), where
                        checked += 1
    assert checked >= 36 * 5


def test_hf_implied_factors_match_transformers():
    # yarn and longrope derive `factor` from max_position_embeddings / original when unset.
    for rope, max_pos in (
        ({"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 4096}, 65536),
        (
            {
                "rope_type": "longrope",
                "short_factor": [1.0] * 48,
                "long_factor": list(np.linspace(1.0, 30.0, 48)),
                "original_max_position_embeddings": 4096,
            },
            131072,
        ),
    ):
        config_json = {"max_position_embeddings": max_pos, "rope_theta": 1e4, "rope_scaling": rope}
        ours_rope = rope_from_hf_config(config_json)
        for seq_len in (None, 100_000):
            ours = rope_frequencies(ours_rope, 96, max_position_embeddings=max_pos, seq_len=seq_len)
            ref = _hf_frequencies(dict(rope, rope_theta=1e4), 96, max_pos, seq_len)
            np.testing.assert_allclose(ours[0], ref[0], rtol=1e-6)
            assert ours[1] == pytest.approx(ref[1], rel=1e-7)


def test_ntk_static_formula_and_dynamic_coincidence():
    for head_dim, theta, factor, orig in ((64, 1e4, 4.0, 2048), (128, 5e5, 16.5, 4096)):
        rope = {"rope_type": "ntk", "factor": factor, "rope_theta": theta}
        ours, attention_factor = rope_frequencies(rope, head_dim, max_position_embeddings=orig)
        dims = np.arange(0, head_dim, 2, dtype=np.float64)
        base = theta * factor ** (head_dim / (head_dim - 2))
        np.testing.assert_allclose(ours, base ** (-dims / head_dim), rtol=1e-6)
        assert attention_factor == 1.0
        # Dynamic NTK with factor 1 at length factor * L grows the base by exactly factor^(d/(d-2)).
        seq_len = int(factor * orig)
        dynamic = {"rope_type": "dynamic", "factor": 1.0, "rope_theta": theta}
        ref, _ = _hf_frequencies(dynamic, head_dim, orig, seq_len)
        np.testing.assert_allclose(ours, ref, rtol=1e-6)


def test_dynamic_yarn_is_yarn_at_the_current_scale():
    orig = 4096
    fields = {"original_max_position_embeddings": orig, "rope_theta": 5e5, "beta_fast": 24.0}
    dynamic = dict(fields, rope_type="dynamic_yarn")
    for seq_len in (None, 1000, orig, orig + 7, 5 * orig, 33 * orig + 11):
        ours = rope_frequencies(dynamic, 128, max_position_embeddings=orig, seq_len=seq_len)
        scale = max(1.0, (seq_len or orig) / orig)
        yarn = dict(fields, rope_type="yarn", factor=scale)
        ref = _hf_frequencies(yarn, 128, orig, seq_len)
        np.testing.assert_allclose(ours[0], ref[0], rtol=1e-6)
        assert ours[1] == pytest.approx(ref[1], rel=1e-7)
        if scale == 1.0:
            default = rope_frequencies({"rope_theta": 5e5}, 128, max_position_embeddings=orig)
            np.testing.assert_allclose(ours[0], default[0], rtol=1e-6)
            assert ours[1] == 1.0


def test_nope_has_no_positional_signal():
    inv_freq, attention_factor = rope_frequencies(
        {"rope_type": "nope", "rope_theta": 1e4}, 64, max_position_embeddings=128
    )
    assert inv_freq.shape == (0,) and attention_factor == 1.0
    x = jnp.asarray(np.random.default_rng().normal(size=(2, 5, 3, 64)), jnp.float32)
    positions = jnp.arange(5)[None].repeat(2, 0)
    assert apply_rope(x, positions, inv_freq=inv_freq) is x


def _hf_logits(q, k, positions, rope, head_dim, max_pos):
    """q, k: [B, T, N, D] numpy -> logits [B, N, T, T] through transformers' rotary path."""
    config = _hf_config(rope, head_dim, max_pos)
    if config.rope_parameters["rope_type"] == "default":
        rotary = PhiRotaryEmbedding(config)  # honours partial_rotary_factor
    else:
        rotary = LlamaRotaryEmbedding(config)
    qt = torch.from_numpy(q).transpose(1, 2)
    kt = torch.from_numpy(k).transpose(1, 2)
    cos, sin = rotary(qt, torch.from_numpy(positions))
    rot = cos.shape[-1]  # partial rotary, as Phi: rotate the first `rot` dims, pass the rest
    q_rot, k_rot = apply_rotary_pos_emb(qt[..., :rot], kt[..., :rot], cos, sin)
    qt = torch.cat([q_rot, qt[..., rot:]], dim=-1)
    kt = torch.cat([k_rot, kt[..., rot:]], dim=-1)
    return torch.einsum("bntd,bnsd->bnts", qt, kt).numpy()


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "default", "rope_theta": 1e4},
        {"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5},
        {"rope_type": "linear", "rope_theta": 5e5, "factor": 4.0},
        {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0},
        {
            "rope_type": "yarn",
            "rope_theta": 1e6,
            "factor": 8.0,
            "original_max_position_embeddings": 64,
        },
        {
            "rope_type": "llama3",
            "rope_theta": 5e5,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        {
            "rope_type": "longrope",
            "rope_theta": 1e4,
            "short_factor": [1.0 + i / 48 for i in range(48)],
            "long_factor": [1.0 + i for i in range(48)],
            "original_max_position_embeddings": 64,
        },
        {"rope_type": "proportional", "rope_theta": 1e6, "partial_rotary_factor": 0.25},
    ],
    ids=lambda r: f"{r['rope_type']}-{r.get('partial_rotary_factor', 1.0)}",
)
def test_logits_match_transformers(rope):
    rng, seed = _rng()
    head_dim, max_pos, length = 96, 64, 48
    for start in (0, 70):  # below and beyond the trained length (dynamic, longrope switch)
        q = rng.normal(size=(2, length, 3, head_dim)).astype(np.float32)
        k = rng.normal(size=(2, length, 3, head_dim)).astype(np.float32)
        positions = np.stack([np.arange(length) + start, np.arange(length) + start // 2])
        seq_len = int(positions.max()) + 1  # what transformers' dynamic update uses
        inv_freq, attention_factor = rope_frequencies(
            rope, head_dim, max_position_embeddings=max_pos, seq_len=seq_len
        )
        pos = jnp.asarray(positions)
        q_rot = apply_rope(
            jnp.asarray(q), pos, inv_freq=inv_freq, attention_factor=attention_factor
        )
        k_rot = apply_rope(
            jnp.asarray(k), pos, inv_freq=inv_freq, attention_factor=attention_factor
        )
        ours = np.asarray(jnp.einsum("btnd,bsnd->bnts", q_rot, k_rot))
        ref = _hf_logits(q, k, positions, rope, head_dim, max_pos)
        scale = np.abs(ref).max()
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * scale, err_msg=f"seed={seed}")


def test_interleaved_layout_is_complex_multiplication():
    rng, seed = _rng()
    head_dim, rotary = 64, 48  # partial: the last 16 dims pass through
    x = rng.normal(size=(2, 7, 3, head_dim)).astype(np.float32)
    positions = rng.integers(0, 5000, size=(2, 7))
    inv_freq = (1e4 ** -(np.arange(0, rotary, 2) / rotary)).astype(np.float32)
    ours = apply_rope(
        jnp.asarray(x),
        jnp.asarray(positions),
        inv_freq=inv_freq,
        attention_factor=1.3,
        interleaved=True,
    )
    pairs = x[..., :rotary:2].astype(np.float64) + 1j * x[..., 1:rotary:2]
    angle = positions[:, :, None, None] * inv_freq.astype(np.float64)
    turned = pairs * 1.3 * np.exp(1j * angle)
    ref = np.stack([turned.real, turned.imag], axis=-1).reshape(2, 7, 3, rotary)
    ref = np.concatenate([ref, x[..., rotary:]], axis=-1)
    # Angles reach ~5000 rad, where float32 positions * inv_freq carry ~2e-4 absolute error.
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=0, atol=2e-3, err_msg=f"seed={seed}")


def test_bfloat16_uses_float32_angles():
    rng, _ = _rng()
    x = rng.normal(size=(1, 16, 2, 64)).astype(np.float32)
    positions = jnp.asarray(rng.integers(0, 100_000, size=(1, 16)))
    inv_freq, _ = rope_frequencies({"rope_theta": 5e5}, 64, max_position_embeddings=8192)
    full = apply_rope(jnp.asarray(x), positions, inv_freq=inv_freq)
    half = apply_rope(jnp.asarray(x, jnp.bfloat16), positions, inv_freq=inv_freq)
    assert half.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(half, np.float32), np.asarray(full), atol=2e-2 * 4)


def test_linear_interpolation_maps_position_p_times_s_to_p():
    rng, seed = _rng()
    x = jnp.asarray(rng.normal(size=(2, 9, 2, 64)).astype(np.float32))
    p = rng.integers(0, 4096, size=(2, 9))
    default, _ = rope_frequencies({"rope_theta": 1e4}, 64, max_position_embeddings=4096)
    for s in (2.0, 4.0, 2.5):
        linear, _ = rope_frequencies(
            {"rope_type": "linear", "factor": s, "rope_theta": 1e4},
            64,
            max_position_embeddings=4096,
        )
        # Angles of position p*s equal the unscaled angles of p (float64 on the returned values).
        np.testing.assert_allclose(
            (p * s)[..., None] * linear.astype(np.float64),
            p[..., None] * default.astype(np.float64),
            rtol=1e-6,
        )
        if s in (2.0, 4.0):  # exact in float32, so the rotated vectors agree too
            scaled = apply_rope(x, jnp.asarray(p * int(s)), inv_freq=linear)
            plain = apply_rope(x, jnp.asarray(p), inv_freq=default)
            np.testing.assert_allclose(scaled, plain, rtol=1e-5, atol=1e-5, err_msg=f"seed={seed}")


def test_yarn_ramp_keeps_fast_and_interpolates_slow_frequencies():
    for head_dim, theta, factor, orig in ((128, 1e4, 8.0, 4096), (64, 5e5, 16.5, 8192)):
        rope = {
            "rope_type": "yarn",
            "factor": factor,
            "original_max_position_embeddings": orig,
            "rope_theta": theta,
        }
        yarn, _ = rope_frequencies(rope, head_dim, max_position_embeddings=orig)
        default, _ = rope_frequencies({"rope_theta": theta}, head_dim, max_position_embeddings=orig)
        ratio = default.astype(np.float64) / yarn

        # YaRN's dimension whose wavelength fits `rotations` times in the original length.
        dims = [
            head_dim * math.log(orig / (r * 2 * math.pi)) / (2 * math.log(theta)) for r in (32, 1)
        ]
        low, high = math.floor(dims[0]), math.ceil(dims[1])
        assert 0 < low < high < head_dim // 2
        np.testing.assert_allclose(ratio[: low + 1], 1.0, rtol=1e-6)  # highest frequencies kept
        np.testing.assert_allclose(ratio[high:], factor, rtol=1e-6)  # lowest divided by factor
        assert np.all(np.diff(ratio) >= -1e-6 * factor)  # monotone ramp between


EXAMPLES = {
    "default": {"rope_theta": 5e5, "partial_rotary_factor": 0.5},
    "linear": {"factor": 4.0},
    "ntk": {"factor": 8.0, "rope_theta": 1e6},
    "dynamic": {"factor": 2.0},
    "yarn": {
        "factor": 40.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "mscale": 1.0,
        "mscale_all_dim": 0.707,
        "truncate": False,
    },
    "dynamic_yarn": {"original_max_position_embeddings": 4096, "attention_factor": 1.2},
    "llama3": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_theta": 5e5,
    },
    "longrope": {
        "short_factor": [1.0, 1.5],
        "long_factor": [3.0, 9.0],
        "original_max_position_embeddings": 4096,
        "factor": 32.0,
    },
    "proportional": {"partial_rotary_factor": 0.25, "rope_theta": 1e6},
    "nope": {},
}


def test_examples_cover_the_registry():
    assert set(EXAMPLES) == set(REGISTRY)


@pytest.mark.parametrize("rope_type", sorted(EXAMPLES))
def test_round_trip_and_old_new_blocks(rope_type):
    new_block = dict(EXAMPLES[rope_type], rope_type=rope_type)
    scaling = parse_rope(new_block)
    assert type(scaling) is REGISTRY[rope_type]
    assert RopeScaling.from_hf(scaling.to_hf()) == scaling
    assert REGISTRY[rope_type].from_hf(scaling.to_hf()) == scaling
    # Older `rope_scaling` block: key `type`, theta and partial rotary in the outer config.
    old_block = {k: v for k, v in new_block.items() if k != "rope_theta"}
    old_block["type"] = old_block.pop("rope_type")
    theta = new_block.get("rope_theta", 1e4)
    assert RopeScaling.from_hf(old_block, rope_theta=theta) == scaling
    outer = {"max_position_embeddings": 4096 * 32, "rope_theta": theta, "rope_scaling": old_block}
    newer = {"max_position_embeddings": 4096 * 32, "rope_parameters": new_block}
    assert parse_rope(rope_from_hf_config(outer)) == parse_rope(rope_from_hf_config(newer))
    assert parse_rope(rope_from_hf_config(newer)) == scaling
    # An ml_collections ConfigDict (what configs/*.py hold) parses the same.
    assert parse_rope(ml_collections.ConfigDict(new_block)) == scaling


def test_rope_from_hf_config_special_cases():
    phi3 = {
        "max_position_embeddings": 131072,
        "original_max_position_embeddings": 4096,  # outside the block, and it wins
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.5,
        "rope_scaling": {
            "type": "longrope",
            "short_factor": [1.0] * 4,
            "long_factor": [2.0] * 4,
            "original_max_position_embeddings": 999,
        },
    }
    rope = rope_from_hf_config(phi3)
    assert rope["original_max_position_embeddings"] == 4096
    assert rope["partial_rotary_factor"] == 0.5 and rope["rope_type"] == "longrope"
    llama = {"max_position_embeddings": 8192, "rope_theta": 5e5, "rope_scaling": None}
    assert rope_from_hf_config(llama) == {"rope_type": "default", "rope_theta": 5e5}
    yarn = {"max_position_embeddings": 32768, "rope_scaling": {"type": "yarn", "factor": 4.0}}
    assert rope_from_hf_config(yarn)["original_max_position_embeddings"] == 32768
    nested = {
        "max_position_embeddings": 8192,
        "rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            "chunked_attention": None,
        },
    }
    layers = rope_from_hf_config(nested)
    assert parse_rope(layers["full_attention"]).factor == 8.0
    assert parse_rope(layers["sliding_attention"]).rope_theta == 1e4
    assert parse_rope(layers["chunked_attention"]).rope_type == "nope"


LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
LONGROPE = {
    "rope_type": "longrope",
    "short_factor": [1.0] * 32,
    "long_factor": [4.0] * 32,
    "original_max_position_embeddings": 4096,
}


@pytest.mark.parametrize(
    "rope, head_dim, bad_key",
    [
        ({"rope_type": "linear", "factor": 0.5}, None, "model.rope.factor"),
        (dict(LLAMA3, factor=0.9), None, "model.rope.factor"),
        (
            {"rope_type": "yarn", "factor": 0.25, "original_max_position_embeddings": 4},
            None,
            "factor",
        ),
        ({k: v for k, v in LLAMA3.items() if k != "low_freq_factor"}, None, "low_freq_factor"),
        ({"rope_type": "yarn", "factor": 4.0}, None, "original_max_position_embeddings"),
        ({"rope_type": "linear"}, None, "model.rope.factor"),
        (dict(LONGROPE, short_factor=[1.0] * 31), 64, "model.rope.short_factor"),
        (dict(LONGROPE, long_factor=[1.0] * 48), 64, "model.rope.long_factor"),
        (LONGROPE, 128, "model.rope.short_factor"),
        ({"rope_type": "xpos"}, None, "model.rope.rope_type"),
        ({"type": "linear", "rope_type": "yarn", "factor": 2.0}, None, "model.rope.rope_type"),
        ({"rope_type": "linear", "factr": 2.0}, None, "model.rope.factr"),
        ({"rope_type": "linear", "factor": "2x"}, None, "model.rope.factor"),
        (dict(LLAMA3, high_freq_factor=0.5), None, "model.rope.high_freq_factor"),
        ({"rope_type": "default", "partial_rotary_factor": 0.3}, 64, "partial_rotary_factor"),
        ({"rope_type": "default", "rope_theta": 0.0}, None, "model.rope.rope_theta"),
    ],
)
def test_validate_rope_rejects_with_the_key_named(rope, head_dim, bad_key):
    with pytest.raises(ValueError, match=r"^model\.rope\.") as error:
        validate_rope(rope, key="model.rope", head_dim=head_dim)
    assert bad_key in str(error.value).split(":")[0]


def test_validate_rope_accepts_valid_blocks():
    validate_rope(LLAMA3, head_dim=128)
    validate_rope(LONGROPE, head_dim=64)
    validate_rope(ml_collections.ConfigDict({"rope_type": "linear", "factor": 2.0, "mscale": None}))
    with pytest.raises(ValueError, match="short_factor"):
        rope_frequencies(LONGROPE, 128, max_position_embeddings=4096)
