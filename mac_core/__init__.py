"""mac_core: the contract of a MAC-Attention decode step, shared by both backends.

``mac_ref`` (the readable reference) and ``mac_triton`` (the fast path) both import this
package and nothing of each other's algorithm: the configuration and its presets, the
acceptance rules, the per-layer state, the types a step exchanges, and the validation of
its inputs. Spec: the docs site's specification page (``docs/spec.md``).

- :mod:`mac_core.config`   :class:`MACConfig`, every knob of the method, and named presets
- :mod:`mac_core.rules`    acceptance rules (the paper's distance test, the mass-aware rule), radius calibrations
- :mod:`mac_core.state`    :class:`LayerState`: the per-layer query and summary rings
- :mod:`mac_core.step`     ``Summary``, ``MatchResult``, ``Spans``, ``StepStats``, the ranges of a row and of a step
- :mod:`mac_core.rope`     rotary embedding and its inverse (the conventions' RoPE)
- :mod:`mac_core.kv`       KV caches: contiguous, or paged through a page table (FlashInfer's layout)
- :mod:`mac_core.interop`  FlashInfer's attention states: base-2 LSE converters, ``merge_state``'s order
- :mod:`mac_core.checks`   input validation of every public entry point
- :mod:`mac_core.numerics` compute dtype and the ⊖ epsilon
"""

from .checks import REFERENCE, BackendLimits, check_prefill_inputs, check_step_inputs
from .config import PRESETS, MACConfig, preset
from .interop import from_flashinfer, lse_from_base2, lse_to_base2, to_flashinfer
from .kv import PagedKV, PageTable, read_keys, to_paged
from .numerics import compute_dtype, removal_epsilon
from .rope import apply_rope, invert_rope, rope_angles, rotate
from .rules import CALIBRATIONS, RULES, MassRule, PaperRule
from .state import LayerState, new_state
from .step import MatchResult, Spans, StepStats, Summary, empty_summary, prefix_end, row_range, step_spans

__all__ = [
    "MACConfig", "PRESETS", "preset", "PaperRule", "MassRule", "RULES", "CALIBRATIONS", "LayerState", "new_state",
    "Summary", "empty_summary", "MatchResult", "Spans", "StepStats", "prefix_end", "row_range", "step_spans",
    "PagedKV", "PageTable", "read_keys", "to_paged", "lse_to_base2", "lse_from_base2", "to_flashinfer", "from_flashinfer", "apply_rope", "invert_rope", "rope_angles", "rotate", "BackendLimits", "REFERENCE", "check_step_inputs", "check_prefill_inputs", "compute_dtype", "removal_epsilon",
]  # fmt: skip
