"""The MAC-Attention configuration: every knob of the method in one dataclass, and the
named presets that the demo, the command line and the examples start from."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .numerics import softmax_scale
from .rules import CALIBRATIONS, RULES, AcceptanceRule, MassRule, PaperRule, radius_scale_from_prompt

ROW_UPDATES = ("split", "subtract")


@dataclass(frozen=True)
class MACConfig:
    """Parameters of MAC-Attention for one layer (spec: [the decode step][spec-decode-step]).

    Attributes:
        window: ring size ``W``: a step matches against the last ``W`` tokens' queries.
            The paper's default is 1024 (the authors' code uses 512).
        band: ``r``: each ring row summarises its token's attention over all keys but its
            own last ``r``; a hit recomputes those ``r`` keys and the ``t − j*`` keys of the lag.
        tau: match threshold ``τ`` of the distance test: a candidate iff
            ``‖q̃_t − q̃_j*‖ < s_h·(1 − τ)·sqrt(2D)``. Higher is stricter; ``τ ≥ 1`` never hits.
        rule: the acceptance rule (:mod:`mac_core.rules`): :class:`~mac_core.rules.PaperRule`
            (the distance test alone, the default) or :class:`~mac_core.rules.MassRule`
            (candidates verified by the mass their row carries).
        group_match: ``False`` (the paper: each query head matches its own row) or ``True``:
            one matched row per KV group, ``j*_g = argmin_j Σ_{h∈g} d_h(j)`` (ties to the most
            recent; a row some head of the group may not reuse, by ``max_chain``, is no
            candidate for the group), each head's distance test and rule at its own
            ``d_h(j*_g)``; the heads of a group then reuse the same step and read the same span.
        radius_scale: ``None`` (``s_h = 1``, the paper) or one positive factor ``s_h`` per
            query head, e.g. from a calibration.
        calibration: ``None`` or the name of a radius calibration
            (:data:`mac_core.rules.CALIBRATIONS`) that sets ``radius_scale`` from the prompt
            (:meth:`calibrated`) before decoding.
        min_context: steps at positions ``t < min_context`` are always misses.
        max_chain: ``None`` (the paper: reuse chains of any length) or the longest reuse
            chain ``K``: a row built by a hit on a row of depth ``d`` has depth ``d + 1``
            (prefill rows and misses: 0), and rows of depth ``≥ K`` are not match
            candidates (spec: [reuse chains][spec-chains]).
        sinks: ``F``: the first ``F`` keys are left out of every ring row and recomputed with
            the current query at every step.
        row_update: ``"split"`` (the row is the band part of this step's attention, no
            subtraction) or ``"subtract"`` (the paper's ``out ⊖ (sinks ⊕ tail)``).
        rope_base: RoPE base used to rotate pre-RoPE queries when no post-RoPE query is given.
        scale: softmax scale; ``None`` means ``1/sqrt(D)``.
        softcap: ``None`` (no cap) or the attention-logit soft-cap ``c > 0`` of Gemma 2's
            ``attn_logit_softcapping``: every score is ``s_j = c·tanh(scale·q·k_j / c)``
            (spec: [conventions][spec-conventions]).
    """

    window: int = 1024
    band: int = 256
    tau: float = 0.45
    rule: AcceptanceRule = PaperRule()
    group_match: bool = False
    radius_scale: tuple[float, ...] | None = None
    calibration: str | None = None
    min_context: int = 0
    max_chain: int | None = None
    sinks: int = 0
    row_update: str = "split"
    rope_base: float = 10000.0
    scale: float | None = None
    softcap: float | None = None

    def __post_init__(self):
        for name in ("window", "band", "min_context", "sinks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"MACConfig.{name} must be an int, got {type(value).__name__}")
        if self.window <= 0:
            raise ValueError(f"MACConfig.window must be > 0, got {self.window}")
        if self.band < 0:
            raise ValueError(f"MACConfig.band must be >= 0, got {self.band}")
        if self.min_context < 0:
            raise ValueError(f"MACConfig.min_context must be >= 0, got {self.min_context}")
        if self.sinks < 0:
            raise ValueError(f"MACConfig.sinks must be >= 0, got {self.sinks}")
        if self.max_chain is not None and (isinstance(self.max_chain, bool) or not isinstance(self.max_chain, int) or self.max_chain < 1):
            raise ValueError(f"MACConfig.max_chain must be None or an int >= 1, got {self.max_chain!r}")
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not math.isfinite(self.tau):
            raise ValueError(f"MACConfig.tau must be a finite number, got {self.tau!r}")
        if not isinstance(self.group_match, bool):
            raise TypeError(f"MACConfig.group_match must be a bool, got {self.group_match!r}")
        if not isinstance(self.rule, tuple(RULES.values())):
            raise TypeError(f"MACConfig.rule must be one of the rules {sorted(RULES)} (mac_core.rules), got {self.rule!r}")
        if self.radius_scale is not None and not (
            isinstance(self.radius_scale, tuple)
            and len(self.radius_scale) > 0
            and all(isinstance(s, (int, float)) and math.isfinite(s) and s > 0 for s in self.radius_scale)
        ):
            raise ValueError(
                f"MACConfig.radius_scale must be None or a non-empty tuple of positive numbers (one per query head), "
                f"got {self.radius_scale!r}"
            )
        if self.calibration is not None and self.calibration not in CALIBRATIONS:
            raise ValueError(f"MACConfig.calibration must be None or one of {CALIBRATIONS}, got {self.calibration!r}")
        if self.row_update not in ROW_UPDATES:
            raise ValueError(f"MACConfig.row_update must be one of {ROW_UPDATES}, got {self.row_update!r}")
        if isinstance(self.rope_base, bool) or not (isinstance(self.rope_base, (int, float)) and self.rope_base > 0):
            raise ValueError(f"MACConfig.rope_base must be a positive number, got {self.rope_base!r}")
        if self.scale is not None and not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale)):
            raise ValueError(f"MACConfig.scale must be None or a finite number, got {self.scale!r}")
        if self.softcap is not None and (
            isinstance(self.softcap, bool) or not isinstance(self.softcap, (int, float)) or not (math.isfinite(self.softcap) and self.softcap > 0)
        ):
            raise ValueError(f"MACConfig.softcap must be None or a finite number > 0, got {self.softcap!r}")

    def hit_radius_sq(self, head_dim: int) -> float:
        """Squared-distance bound of the distance test: ``2·D·(1 − τ)²``, and 0 (no hits) for ``τ ≥ 1``."""
        return 2.0 * head_dim * max(1.0 - self.tau, 0.0) ** 2

    def radius_sq_per_head(self, q_heads: int, head_dim: int, tau: float | None = None) -> list[float]:
        """``[Hq]`` squared radii ``2D(1 − τ)² s_h²`` (of another ``tau`` if given; call
        :meth:`check_heads` first)."""
        scales = self.radius_scale or (1.0,) * q_heads
        radius_sq = 2.0 * head_dim * max(1.0 - (self.tau if tau is None else tau), 0.0) ** 2
        return [radius_sq * s**2 for s in scales]

    def softmax_scale(self, head_dim: int) -> float:
        """The softmax scale: :attr:`scale`, or ``1/sqrt(D)``."""
        return softmax_scale(head_dim, self.scale)

    def for_layer(self, layer: int, n_layers: int) -> "MACConfig":
        """Layer ``layer``'s configuration in a model of ``n_layers``: itself, or where the
        rule has a threshold per layer (``MassRule.layer_tau_m``) the rule of that layer."""
        per_layer = getattr(self.rule, "layer_tau_m", None)
        if per_layer is None:
            return self
        if len(per_layer) != n_layers:
            raise ValueError(f"config.rule.layer_tau_m must hold one threshold per layer ({n_layers}), got {len(per_layer)}")
        if not 0 <= layer < n_layers:
            raise ValueError(f"layer must lie in [0, {n_layers}), got {layer}")
        return dataclasses.replace(self, rule=dataclasses.replace(self.rule, tau_m=per_layer[layer], layer_tau_m=None))

    def check_layer(self) -> None:
        """A step is one layer's: a rule with a threshold per layer is resolved by :meth:`for_layer` first."""
        if getattr(self.rule, "layer_tau_m", None) is not None:
            raise ValueError("config.rule.layer_tau_m holds a threshold per layer, and a step is one layer's: "
                             "pass config.for_layer(layer, n_layers)")

    def check_heads(self, q_heads: int) -> None:
        """What a step of ``Hq`` query heads needs of the configuration (one layer's: :meth:`check_layer`)."""
        self.check_layer()
        if self.radius_scale is not None and len(self.radius_scale) != q_heads:
            raise ValueError(f"config.radius_scale must have one factor per query head ({q_heads}), got {len(self.radius_scale)}")
        if self.calibration is not None and self.radius_scale is None:
            raise ValueError(
                f"config.calibration is {self.calibration!r} but config.radius_scale is unset: "
                "calibrate the configuration from the prompt first (MACConfig.calibrated)"
            )

    def calibrated(self, q_pre, k_cache, prompt_len: int) -> "MACConfig":
        """This configuration with ``radius_scale`` set from a prompt by :attr:`calibration`
        (itself when there is none); see :func:`mac_core.rules.radius_scale_from_prompt`."""
        if self.calibration is None:
            return self
        scale = radius_scale_from_prompt(self.calibration, q_pre, k_cache, prompt_len, self.sinks)
        return dataclasses.replace(self, radius_scale=scale)

    def describe(self) -> str:
        """One line: the knobs a run report needs."""
        parts = [f"rule {self.rule.describe()}", f"tau {self.tau:g}", f"window {self.window}", f"band {self.band}", f"sinks {self.sinks}"]
        parts.append(f"max chain {self.max_chain}" if self.max_chain else "max chain none")
        if self.calibration:
            parts.append(f"calibration {self.calibration}")
        if self.softcap is not None:
            parts.append(f"softcap {self.softcap:g}")
        return ", ".join(parts)


PRESETS: dict[str, MACConfig] = {
    # the paper's defaults (W 1024, r 256, τ 0.45)
    "paper": MACConfig(),
    # the demo's: the point of the real-model study (docs/real_model.md#the-demos-defaults)
    # chosen on the pydoc topics and confirmed on the stdlib docstrings: a short window, the
    # paper's band, 4 sinks, only exact rows reused; candidates at a loose cap (τ 0.3)
    # verified by the mass their row carries, one decision per KV group
    "demo": MACConfig(window=256, band=256, tau=0.3, sinks=4, max_chain=1, rule=MassRule(tau_m=0.85, per_group=True)),
    # the command line's synthetic streams: short, so the reference runs in seconds
    "synthetic": MACConfig(window=256, band=64),
}


def preset(name: str, **changes) -> MACConfig:
    """A named configuration of :data:`PRESETS`, with any field changed."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: expected one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **changes)
