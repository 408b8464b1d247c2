r"""How far MAC-Attention moves a real model's predictions from full attention's.

Two regimes (see ``docs/real_model.md``):

- **teacher forcing**: the model reads prose it did not write; at each position MAC and full
  attention see the same tokens and their next-token distributions are compared.
- **free generation**: full attention writes ``N`` tokens greedily after the prompt; MAC
  reads that text under teacher forcing. Its first top-1 disagreement is exactly where a free
  greedy MAC run would leave the full-attention text (before it the two runs are identical).

Metrics of a run (:func:`fidelity`): hit rate; KV reads skipped per query head and per KV
group (:meth:`mac_core.step.StepStats.skipped_fraction`);
top-1 agreement; ``KL(full ‖ MAC)`` mean and worst step; perplexity change
``exp(mean NLL_MAC − mean NLL_full) − 1`` and its standard error; how far MAC moves full
attention's top-2 logit gap (median and 99th percentile) and the share of near-ties (gap
below :data:`NEAR_TIE`); the reuse-chain depth of hits (mean and largest: a hit's row reuses
a row that may itself be a reuse); relative attention-output error per layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

FIDELITY_CHUNK = 64  # steps per float64 pass in fidelity()
NEAR_TIE = 0.05  # a top-2 logit gap below this is a near-tie (float32 rounding moves logits by ~5e-5)


def fidelity(full_logits: torch.Tensor, mac_logits: torch.Tensor, targets: torch.Tensor, backend) -> dict:
    """Compare MAC with full attention on the same positions.

    Args:
        full_logits, mac_logits: ``[B, N, V]`` next-token logits at the decoded positions.
        targets: ``[B, N]`` the tokens that follow (for the perplexities).
        backend: the run's :class:`~mac_llm.attention.MACAttention` (its per-step statistics).

    Returns:
        A flat dict of scalars (see the module docstring) plus per-layer lists
        ``layer_hit``, ``layer_skipped``, ``layer_err_mean``, ``layer_err_max``.
    """
    kl, nll_full, nll_mac = [], [], []
    for lo in range(0, full_logits.shape[1], FIDELITY_CHUNK):  # float64 in chunks of steps: long runs fit in memory
        log_p = F.log_softmax(full_logits[:, lo : lo + FIDELITY_CHUNK].double(), -1)
        log_q = F.log_softmax(mac_logits[:, lo : lo + FIDELITY_CHUNK].double(), -1)
        tgt = targets[:, lo : lo + FIDELITY_CHUNK, None]
        kl.append((log_p.exp() * (log_p - log_q)).sum(-1))
        nll_full.append(-log_p.gather(-1, tgt).squeeze(-1))
        nll_mac.append(-log_q.gather(-1, tgt).squeeze(-1))
    kl, nll_full, nll_mac = torch.cat(kl, 1), torch.cat(nll_full, 1), torch.cat(nll_mac, 1)  # [B, N]
    agree = full_logits.argmax(-1) == mac_logits.argmax(-1)  # [B, N]
    # the greedy decision's margin: full attention's top-2 gap, and how far MAC moves it
    top2 = full_logits.topk(2, dim=-1)  # [B, N, 2]
    full_gap = top2.values[..., 0] - top2.values[..., 1]
    mac_pair = mac_logits.gather(-1, top2.indices)
    gap_err = ((mac_pair[..., 0] - mac_pair[..., 1]) - full_gap).abs().flatten().double()
    disagree_steps = (~agree).any(dim=0).nonzero()
    worst = int(kl.max(dim=0).values.argmax())

    stats = backend.layer_stats()  # fields [S, n_layers, B, Hq]
    hit = stats.hit.float()
    full_reads = stats.context[..., None].expand_as(stats.keys_read).double()  # [S, n_layers, B, Hq]
    reads = stats.keys_read.double()
    result = {
        **stats.summary(backend.kv_heads),
        "top1": agree.double().mean().item(),
        "kl_mean": kl.mean().item(),
        "kl_max": kl.max().item(),
        "kl_worst_step": worst,
        "ppl_full": math.exp(nll_full.mean().item()),
        "ppl_mac": math.exp(nll_mac.mean().item()),
        "first_disagreement": int(disagree_steps[0]) if len(disagree_steps) else -1,
        # how close full attention's own top two were where MAC first picked another token
        "flip_margin": _first_flip_margin(full_logits, agree),
        # a greedy token flips where MAC moves the top-2 gap by more than the gap itself
        "gap_err_median": gap_err.median().item(),
        "gap_err_p99": gap_err.quantile(0.99).item(),
        "near_ties": (full_gap < NEAR_TIE).double().mean().item(),
        # how deep reuse chains grow (a hit's row reuses a row that may itself be a reuse)
        "chain_mean": stats.chain_depth[stats.hit].double().mean().item() if stats.hit.any() else 0.0,
        "chain_max": int(stats.chain_depth.max()),
        "layer_hit": hit.mean(dim=(0, 2, 3)).tolist(),
        "layer_skipped": (1 - reads.sum(dim=(0, 2, 3)) / full_reads.sum(dim=(0, 2, 3))).tolist(),
    }
    result["ppl_change"] = result["ppl_mac"] / result["ppl_full"] - 1
    # standard error of the change (delta method on the mean per-token NLL difference)
    diff = (nll_mac - nll_full).flatten()
    result["ppl_change_se"] = (result["ppl_change"] + 1) * (diff.std() / math.sqrt(diff.numel())).item() if diff.numel() > 1 else math.nan
    if backend.measure_error:
        err = torch.stack([torch.stack(e) for e in backend.errors], dim=1)  # [S, n_layers, B, Hq]
        result["err_mean"] = err.mean().item()
        result["err_max"] = err.max().item()
        result["layer_err_mean"] = err.mean(dim=(0, 2, 3)).tolist()
        result["layer_err_max"] = err.amax(dim=(0, 2, 3)).tolist()
    return result


def _first_flip_margin(full_logits: torch.Tensor, agree: torch.Tensor) -> float:
    """Smallest top-1 − top-2 logit gap of full attention at each request's first disagreement (nan: none)."""
    margins = []
    for b in range(agree.shape[0]):
        flips = (~agree[b]).nonzero()
        if len(flips):
            top2 = full_logits[b, int(flips[0])].topk(2).values
            margins.append((top2[0] - top2[1]).item())
    return min(margins) if margins else math.nan


def compare_logits(reference: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """Teacher-forced MAC against full attention on the same tokens.

    Args:
        reference, logits: ``[S, B, V]`` full attention's and MAC's logits after each fed token.
        targets: ``[S, B]`` the fed tokens (``logits[s]`` predicts ``targets[s + 1]``).

    Returns:
        ``kl_mean``, ``top1``, ``ppl_change`` and ``ppl_change_se`` (over the ``S − 1`` scored
        positions of every request), ``scored_tokens``.
    """
    log_p, log_q = F.log_softmax(reference.double(), -1), F.log_softmax(logits.double(), -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # [S, B]
    nll_full = -log_p[:-1].gather(-1, targets[1:, :, None]).squeeze(-1)
    nll_mac = -log_q[:-1].gather(-1, targets[1:, :, None]).squeeze(-1)
    diff = (nll_mac - nll_full).flatten()
    change = math.exp(diff.mean().item()) - 1
    return {
        "kl_mean": kl.mean().item(), "top1": (reference.argmax(-1) == logits.argmax(-1)).double().mean().item(),
        "ppl_change": change, "ppl_change_se": (change + 1) * (diff.std() / math.sqrt(diff.numel())).item(),
        "scored_tokens": diff.numel(),
    }


def repeated_ngrams(tokens: list[int], n: int = 4) -> float:
    """Share of the text's ``n``-grams that already occurred earlier in it (degeneration: loops)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    seen, repeats = set(), 0
    for gram in grams:
        repeats += gram in seen
        seen.add(gram)
    return repeats / len(grams) if grams else 0.0


def scored_perplexity(logits: torch.Tensor, first_logits: torch.Tensor, tokens: torch.Tensor) -> float:
    """Perplexity of ``tokens [N]`` under full attention: ``first_logits [V]`` predict the first,
    ``logits [N, V]`` (full attention after each token) the rest."""
    predictions = torch.cat([first_logits[None], logits[:-1]]).double().log_softmax(-1)  # [N, V]
    return math.exp(-predictions.gather(-1, tokens[:, None]).mean().item())
