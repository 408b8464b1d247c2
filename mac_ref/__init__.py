"""mac_ref: a readable pure-PyTorch reference of MAC-Attention (arXiv 2604.00235).

One module per stage, read top to bottom:

- :mod:`mac_ref.summary`  attention summaries ``(o, lse)``, ``attend``, ⊕ ``merge``, ⊖ ``remove``, FlashInfer's ``merge_state``
- :mod:`mac_ref.match`    ``find_match``: nearest recent pre-RoPE query, the distance test
- :mod:`mac_ref.accept`   ``accept_candidates``: the acceptance rule picks the hits among the candidates
- :mod:`mac_ref.amend`    ``amend_row``: the reused row ⊕ the band (the ranges: ``mac_core.step.step_spans``)
- :mod:`mac_ref.complete` ``edge_summaries``, ``complete_output``, ``amend_complete``: sinks ⊕ C ⊕ tail
- :mod:`mac_ref.decode`   ``decode_step`` for a batch, ``prefill``, the row update
- :mod:`mac_ref.verify`   ``verify_attention`` (``verify_step`` unchecked): full attention of a block of queries with their exact rows (lossless MAC)
- :mod:`mac_ref.stream`   ``run_stream``: a whole stream through one layer
- :mod:`mac_ref.oracle`   float64 dense full attention
- :mod:`mac_ref.synthetic` synthetic streams with controllable query reuse

The step's contract (configuration, state, result types, validation, RoPE) is :mod:`mac_core`,
shared with ``mac_triton``; its names are re-exported here.
"""

from mac_core import (
    PRESETS,
    LayerState,
    MACConfig,
    MassRule,
    MatchResult,
    PagedKV,
    PageTable,
    PaperRule,
    Spans,
    StepStats,
    Summary,
    empty_summary,
    new_state,
    prefix_end,
    preset,
    step_spans,
    removal_epsilon,
    to_paged,
)
from mac_core.step import Completion

from .accept import Decision, accept_candidates, mass_share
from .amend import amend_row
from .complete import amend_complete, complete_output, edge_summaries
from .decode import decode_step, prefill, update_row
from .match import find_match
from .oracle import causal_attention, full_attention
from mac_core.rope import apply_rope, invert_rope
from .stream import StreamResult, run_stream
from .summary import attend, merge, merge_all, merge_state, remove
from .synthetic import synthetic_stream
from .verify import verify_attention, verify_step

__all__ = [
    "MACConfig", "PRESETS", "preset", "PagedKV", "PageTable", "to_paged", "PaperRule", "MassRule", "LayerState", "new_state", "Summary", "empty_summary",
    "attend", "merge", "merge_all", "merge_state", "remove", "removal_epsilon", "apply_rope", "invert_rope", "MatchResult",
    "find_match", "accept_candidates", "Decision", "mass_share", "Spans", "prefix_end", "step_spans", "amend_row", "Completion", "edge_summaries", "complete_output",
    "amend_complete", "update_row", "StepStats", "decode_step", "prefill", "StreamResult", "run_stream",
    "full_attention", "causal_attention", "synthetic_stream", "verify_attention", "verify_step",
]  # fmt: skip
