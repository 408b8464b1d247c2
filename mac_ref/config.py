"""The MAC-Attention configuration: every knob of the method in one dataclass."""

from __future__ import annotations

import math
from dataclasses import dataclass

ROW_UPDATES = ("split", "subtract")


@dataclass(frozen=True)
class MACConfig:
    """Parameters of MAC-Attention for one layer (SPEC §4).

    Attributes:
        window: ring size ``W``: a step matches against the last ``W`` tokens' queries.
            The paper's default is 1024 (the authors' code uses 512).
        band: ``r``: each ring row summarises its token's attention over all keys but its
            own last ``r``; on a hit those ``r`` keys (plus the match lag) are recomputed.
        tau: match threshold ``τ``: hit iff ``‖q̃_t − q̃_j*‖ < (1 − τ)·sqrt(2D)``. Higher is
            stricter; ``τ ≥ 1`` never hits.
        radius_scale: ``None`` (the paper's rule, the reference behaviour) or one positive
            factor ``s_h`` per query head: hit iff ``‖q̃_t − q̃_j*‖ < s_h·(1 − τ)·sqrt(2D)``.
            The paper's radius assumes unit-variance queries; a trained model's heads differ
            in query and key scale, and ``s_h`` calibrates the radius per head (e.g. from the
            prompt's key norms, see ``mac_llm.calibrate``). ``τ`` stays the global knob.
        min_context: steps at positions ``t < min_context`` are always misses.
        max_chain: ``None`` (the paper: reuse chains of any length) or the longest reuse
            chain ``K``: a row built by a hit on a row of depth ``d`` has depth ``d + 1``
            (prefill rows and misses: 0), and rows of depth ``≥ K`` are not match
            candidates. A hit inherits its row's far prefix, which may itself be inherited,
            so errors chain until a miss; ``K`` bounds how far (see the real-model study).
        sinks: ``F``: the first ``F`` keys are left out of every ring row and recomputed with
            the current query at every step.
        row_update: ``"split"`` (the row is the band part of this step's attention, no
            subtraction) or ``"subtract"`` (the paper's ``out ⊖ A(q_t, tail)``).
        rope_base: RoPE base used to rotate pre-RoPE queries when no post-RoPE query is given.
        scale: softmax scale; ``None`` means ``1/sqrt(D)``.
    """

    window: int = 1024
    band: int = 256
    tau: float = 0.45
    radius_scale: tuple[float, ...] | None = None
    min_context: int = 0
    max_chain: int | None = None
    sinks: int = 0
    row_update: str = "split"
    rope_base: float = 10000.0
    scale: float | None = None

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
        if not isinstance(self.tau, (int, float)) or not math.isfinite(self.tau):
            raise ValueError(f"MACConfig.tau must be a finite number, got {self.tau!r}")
        if self.radius_scale is not None and not (
            isinstance(self.radius_scale, tuple)
            and len(self.radius_scale) > 0
            and all(isinstance(s, (int, float)) and math.isfinite(s) and s > 0 for s in self.radius_scale)
        ):
            raise ValueError(
                f"MACConfig.radius_scale must be None or a non-empty tuple of positive numbers (one per query head), "
                f"got {self.radius_scale!r}"
            )
        if self.row_update not in ROW_UPDATES:
            raise ValueError(f"MACConfig.row_update must be one of {ROW_UPDATES}, got {self.row_update!r}")
        if not (isinstance(self.rope_base, (int, float)) and self.rope_base > 0):
            raise ValueError(f"MACConfig.rope_base must be a positive number, got {self.rope_base!r}")
        if self.scale is not None and not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale)):
            raise ValueError(f"MACConfig.scale must be None or a finite number, got {self.scale!r}")

    def hit_radius_sq(self, head_dim: int) -> float:
        """Squared-distance bound of a hit: ``2·D·(1 − τ)²``, and 0 (no hits) for ``τ ≥ 1``."""
        return 2.0 * head_dim * max(1.0 - self.tau, 0.0) ** 2

    def softmax_scale(self, head_dim: int) -> float:
        """The softmax scale: :attr:`scale`, or ``1/sqrt(D)``."""
        return 1.0 / math.sqrt(head_dim) if self.scale is None else self.scale
