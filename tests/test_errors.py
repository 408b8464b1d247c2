"""Bad input: every error class raises the documented error, and the message names the argument.

A wrong call must fail loudly at the boundary instead of producing a silent NaN or a wrong
answer. Device mismatches are faked with the ``meta`` device (no GPU needed).
"""

import dataclasses
import math

import pytest
import torch

from mac_ref import (
    MACConfig,
    Summary,
    apply_rope,
    attend,
    decode_step,
    merge,
    merge_all,
    prefill,
    remove,
    run_stream,
    synthetic_stream,
)

B, HQ, HKV, T, D = 2, 4, 2, 16, 8
CONFIG = MACConfig(window=4, band=2, tau=0.45)


def valid_step():
    """Arguments of a valid decode step at position 3, after a prefill of 3 tokens."""
    q, k, v = synthetic_stream(B, HQ, HKV, T, D, seed=0)
    _, _, state = prefill(q[:, :, :3], k, v, 3, CONFIG)
    return dict(
        q_pre=q[:, :, 3], k_cache=k, v_cache=v, state=state, positions=torch.tensor([3, 3]), config=CONFIG
    )


def meta(x):
    return x.to("meta")


# (id, {argument: replacement}, error, message pattern)
STEP_CASES = [
    ("q_pre rank", dict(q_pre=lambda a: a["q_pre"][:, 0]), ValueError, r"q_pre must have 3 dimensions \[B, Hq, D\]"),
    ("q_pre int", dict(q_pre=lambda a: a["q_pre"].long()), TypeError, "q_pre must have a floating dtype"),
    ("q_pre list", dict(q_pre=lambda a: a["q_pre"].tolist()), TypeError, "q_pre must be a torch.Tensor"),
    ("k_cache rank", dict(k_cache=lambda a: a["k_cache"][0]), ValueError, "k_cache must have 4 dimensions"),
    ("k_cache int", dict(k_cache=lambda a: a["k_cache"].int()), TypeError, "k_cache must have a floating dtype"),
    ("v_cache None", dict(v_cache=lambda a: None), TypeError, "v_cache must be a torch.Tensor"),
    ("v_cache shape", dict(v_cache=lambda a: a["v_cache"][:, :, :8]), ValueError, "k_cache and v_cache must have one shape"),
    (
        "cache head_dim",
        dict(k_cache=lambda a: a["k_cache"][..., :6], v_cache=lambda a: a["v_cache"][..., :6]),
        ValueError,
        r"k_cache must have shape \[B=2, Hkv, T, D=8\]",
    ),
    (
        "cache batch",
        dict(k_cache=lambda a: a["k_cache"][:1], v_cache=lambda a: a["v_cache"][:1]),
        ValueError,
        r"k_cache must have shape \[B=2",
    ),
    (
        "kv heads do not divide",
        dict(k_cache=lambda a: a["k_cache"].repeat(1, 2, 1, 1)[:, :3], v_cache=lambda a: a["v_cache"].repeat(1, 2, 1, 1)[:, :3]),
        ValueError,
        r"query heads of q_pre \(4\) must be a multiple of the KV heads of k_cache \(3\)",
    ),
    ("q_post shape", dict(q_post=lambda a: a["q_pre"][:, :2]), ValueError, "q_post must have q_pre's shape"),
    ("q_post int", dict(q_post=lambda a: a["q_pre"].long()), TypeError, "q_post must have a floating dtype"),
    ("positions float", dict(positions=lambda a: a["positions"].double()), TypeError, "positions must have dtype int32 or int64"),
    ("positions list", dict(positions=lambda a: [3, 3]), TypeError, "positions must be a torch.Tensor"),
    ("positions shape", dict(positions=lambda a: torch.tensor([3, 3, 3])), ValueError, r"positions must have shape \(2,\)"),
    ("beyond capacity", dict(positions=lambda a: torch.tensor([3, T])), ValueError, r"positions \[3, 16\] must lie in \[0, 16\), the KV cache capacity"),
    ("negative position", dict(positions=lambda a: torch.tensor([-1, 3])), ValueError, "KV cache capacity"),
    ("skipped step", dict(positions=lambda a: torch.tensor([4, 3])), ValueError, r"positions \[4, 3\] do not follow the previous step: the state expects \[3, 3\]"),
    ("repeated step", dict(positions=lambda a: torch.tensor([2, 2])), ValueError, "do not follow the previous step"),
    ("k_cache device", dict(k_cache=lambda a: meta(a["k_cache"])), ValueError, "all tensors must be on one device.*k_cache on meta"),
    ("positions device", dict(positions=lambda a: meta(a["positions"])), ValueError, "one device.*positions on meta"),
    ("q_post device", dict(q_post=lambda a: meta(a["q_pre"])), ValueError, "one device.*q_post on meta"),
    ("window of the state", dict(config=lambda a: MACConfig(window=8, band=2)), ValueError, r"state.ring_q must have shape \[B=2, Hq=4, W=8, D=8\]"),
    ("ring_depth dtype", dict(state=lambda a: dataclasses.replace(a["state"], ring_depth=a["state"].ring_depth.long())), ValueError, "state.ring_depth must be int32"),
    ("radius_scale length", dict(config=lambda a: MACConfig(window=4, band=2, radius_scale=(1.0, 1.0))), ValueError, "config.radius_scale must have one factor per query head"),
]


@pytest.mark.parametrize("changes, error, pattern", [c[1:] for c in STEP_CASES], ids=[c[0] for c in STEP_CASES])
def test_decode_step_rejects(changes, error, pattern):
    args = valid_step()
    args.update({name: make(args) for name, make in changes.items()})
    next_pos = args["state"].next_pos.clone()
    with pytest.raises(error, match=pattern):
        decode_step(**args)
    assert torch.equal(args["state"].next_pos, next_pos)  # a refused step leaves the state alone


def test_the_valid_step_is_accepted():
    out, lse, _ = decode_step(**valid_step())
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()


CONFIG_CASES = [
    (dict(window=0), ValueError, "MACConfig.window must be > 0"),
    (dict(window=-3), ValueError, "MACConfig.window must be > 0"),
    (dict(window=4.0), TypeError, "MACConfig.window must be an int"),
    (dict(window=True), TypeError, "MACConfig.window must be an int"),
    (dict(band=-1), ValueError, "MACConfig.band must be >= 0"),
    (dict(band=None), TypeError, "MACConfig.band must be an int"),
    (dict(tau=math.nan), ValueError, "MACConfig.tau must be a finite number"),
    (dict(tau=math.inf), ValueError, "MACConfig.tau must be a finite number"),
    (dict(tau=-math.inf), ValueError, "MACConfig.tau must be a finite number"),
    (dict(tau="0.5"), ValueError, "MACConfig.tau must be a finite number"),
    (dict(sinks=-1), ValueError, "MACConfig.sinks must be >= 0"),
    (dict(min_context=-2), ValueError, "MACConfig.min_context must be >= 0"),
    (dict(row_update="merge"), ValueError, "MACConfig.row_update must be one of"),
    (dict(rope_base=0.0), ValueError, "MACConfig.rope_base must be a positive number"),
    (dict(scale=math.nan), ValueError, "MACConfig.scale must be None or a finite number"),
    (dict(softcap=0.0), ValueError, "MACConfig.softcap must be None or a finite number > 0"),
    (dict(softcap=-1.0), ValueError, "MACConfig.softcap must be None or a finite number > 0"),
    (dict(softcap=math.nan), ValueError, "MACConfig.softcap must be None or a finite number > 0"),
    (dict(softcap=math.inf), ValueError, "MACConfig.softcap must be None or a finite number > 0"),
    (dict(softcap="50"), ValueError, "MACConfig.softcap must be None or a finite number > 0"),
    (dict(softcap=True), ValueError, "MACConfig.softcap must be None or a finite number > 0"),
    (dict(radius_scale=(1.0, 0.0)), ValueError, "MACConfig.radius_scale must be None or a non-empty tuple"),
    (dict(radius_scale=[1.0]), ValueError, "MACConfig.radius_scale"),
    (dict(radius_scale=()), ValueError, "MACConfig.radius_scale"),
    (dict(max_chain=0), ValueError, "MACConfig.max_chain must be None or an int >= 1"),
    (dict(max_chain=2.0), ValueError, "MACConfig.max_chain must be None or an int >= 1"),
    (dict(max_chain=True), ValueError, "MACConfig.max_chain must be None or an int >= 1"),
]


@pytest.mark.parametrize("fields, error, pattern", CONFIG_CASES, ids=[str(c[0]) for c in CONFIG_CASES])
def test_config_rejects(fields, error, pattern):
    with pytest.raises(error, match=pattern):
        MACConfig(**fields)


def qkv():
    return synthetic_stream(B, HQ, HKV, T, D, seed=1)


def summary(shape=(2, 3), dtype=torch.float32):
    return Summary(torch.ones(*shape, D, dtype=dtype), torch.zeros(shape, dtype=dtype))


LIBRARY_CASES = [
    # attend
    ("attend k rank", lambda q, k, v: attend(q[:, :, 0], k[0], v, 0, 4), ValueError, r"k must have 4 dimensions \[B, Hkv, T, D\]"),
    ("attend q rank", lambda q, k, v: attend(q[0, 0], k, v, 0, 4), ValueError, r"q must have shape \[B, Hq, D\]"),
    ("attend q int", lambda q, k, v: attend(q[:, :, 0].long(), k, v, 0, 4), TypeError, "q must have a floating dtype"),
    ("attend float bounds", lambda q, k, v: attend(q[:, :, 0], k, v, 0.0, 4.0), TypeError, "range bounds must be integers"),
    ("attend k/v shapes", lambda q, k, v: attend(q[:, :, 0], k, v[:, :, :5], 0, 4), ValueError, "k and v must have one shape"),
    ("attend head_dim", lambda q, k, v: attend(q[:, :, 0, :6], k, v, 0, 4), ValueError, r"k must have shape \[B=2, Hkv, T, D=6\]"),
    ("attend kv heads", lambda q, k, v: attend(q[:, :3, 0], k, v, 0, 4), ValueError, r"query heads of q \(3\) must be a multiple of the KV heads of k \(2\)"),
    ("attend device", lambda q, k, v: attend(q[:, :, 0], k, meta(v), 0, 4), ValueError, "one device.*v on meta"),
    ("attend bounds shape", lambda q, k, v: attend(q[:, :, 0], k, v, torch.zeros(3, dtype=torch.long), 4), ValueError, r"range bounds of shape \(3,\) do not broadcast"),
    # merge, merge_all, remove
    ("merge non-tensor", lambda q, k, v: merge(Summary([1.0], [0.0]), summary()), TypeError, "a.o must be a torch.Tensor"),
    ("merge int", lambda q, k, v: merge(summary(), summary(dtype=torch.int64)), TypeError, "b.o must have a floating dtype"),
    ("merge shapes", lambda q, k, v: merge(summary(), summary((2, 4))), ValueError, "a and b must share o"),
    ("merge lse int", lambda q, k, v: merge(summary(), Summary(torch.ones(2, 3, D), torch.zeros(2, 3, dtype=torch.long))), TypeError, "b.lse must have a floating dtype"),
    ("merge device", lambda q, k, v: merge(summary(), Summary(*map(meta, summary()))), ValueError, "one device.*b.o on meta"),
    ("merge_all device", lambda q, k, v: merge_all(torch.ones(2, 3, D), meta(torch.zeros(2, 3))), ValueError, "one device.*lse on meta"),
    ("remove device", lambda q, k, v: remove(summary(), Summary(*map(meta, summary()))), ValueError, "one device.*part.o on meta"),
    ("merge lse shape", lambda q, k, v: merge(summary(), Summary(torch.ones(2, 3, D), torch.zeros(2))), ValueError, "a and b must share"),
    ("merge_all rank", lambda q, k, v: merge_all(torch.ones(D), torch.zeros(())), ValueError, r"o must be \[..., S, D\] and lse \[..., S\]"),
    ("merge_all shapes", lambda q, k, v: merge_all(torch.ones(2, 3, D), torch.zeros(2, 4)), ValueError, r"o must be \[..., S, D\]"),
    ("merge_all lse int", lambda q, k, v: merge_all(torch.ones(2, 3, D), torch.zeros(2, 3, dtype=torch.long)), TypeError, "lse must have a floating dtype"),
    ("remove shapes", lambda q, k, v: remove(summary(), summary((3, 3))), ValueError, "total and part must share"),
    ("remove int", lambda q, k, v: remove(summary(), summary(dtype=torch.int32)), TypeError, "part.o must have a floating dtype"),
    # rope
    ("rope odd head_dim", lambda q, k, v: apply_rope(torch.ones(3, 7), 1), ValueError, "head_dim must be even"),
    ("rope float positions", lambda q, k, v: apply_rope(q, torch.ones(T)), TypeError, "positions must be integers"),
    ("rope positions shape", lambda q, k, v: apply_rope(q, torch.arange(5)), ValueError, r"positions of shape \(5,\) do not broadcast"),
    ("rope x int", lambda q, k, v: apply_rope(q.long(), 0), TypeError, "x must have a floating dtype"),
    # prefill
    ("prefill q_pre rank", lambda q, k, v: prefill(q[:, :, 0], k, v, 3, CONFIG), ValueError, r"q_pre must have 4 dimensions \[B, Hq, L, D\]"),
    ("prefill beyond capacity", lambda q, k, v: prefill(q, k[:, :, :8], v[:, :, :8], 3, CONFIG), ValueError, "q_pre has 16 positions, more than the KV cache capacity 8"),
    ("prefill long prompt", lambda q, k, v: prefill(q[:, :, :4], k, v, 5, CONFIG), ValueError, r"prompt_lengths \[5, 5\] must lie in \[0, 4\]"),
    ("prefill negative prompt", lambda q, k, v: prefill(q, k, v, torch.tensor([-1, 2]), CONFIG), ValueError, "prompt_lengths"),
    ("prefill float prompt", lambda q, k, v: prefill(q, k, v, torch.tensor([1.0, 2.0]), CONFIG), TypeError, "prompt_lengths must have dtype int32 or int64"),
    ("prefill prompt shape", lambda q, k, v: prefill(q, k, v, torch.tensor([1, 2, 3]), CONFIG), ValueError, r"prompt_lengths must have shape \(2,\)"),
    ("prefill device", lambda q, k, v: prefill(q, meta(k), v, 3, CONFIG), ValueError, "one device.*k_cache on meta"),
    # streams
    ("stream without decode", lambda q, k, v: run_stream(q, k, v, T, CONFIG), ValueError, "the stream has no decode step"),
    ("stream q_post", lambda q, k, v: run_stream(q, k, v, 3, CONFIG, q_post=q[:, :2]), ValueError, "q_post must have q_pre's shape"),
    ("stream q_pre rank", lambda q, k, v: run_stream(q[0], k, v, 3, CONFIG), ValueError, "q_pre must have 4 dimensions"),
    ("synthetic reuse", lambda q, k, v: synthetic_stream(1, 2, 1, 8, 8, reuse=1.5), ValueError, r"reuse must lie in \[0, 1\]"),
    ("synthetic heads", lambda q, k, v: synthetic_stream(1, 3, 2, 8, 8), ValueError, r"q_heads \(3\) must be a multiple of kv_heads \(2\)"),
]


@pytest.mark.parametrize("call, error, pattern", [c[1:] for c in LIBRARY_CASES], ids=[c[0] for c in LIBRARY_CASES])
def test_library_functions_reject(call, error, pattern):
    q, k, v = qkv()
    with pytest.raises(error, match=pattern):
        call(q, k, v)
