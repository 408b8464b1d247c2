"""mac_ref: a readable pure-PyTorch reference of MAC-Attention (arXiv 2604.00235).

One module per concept, read top to bottom:

- :mod:`mac_ref.summary`  attention summaries ``(o, lse)``, ``attend``, ⊕ ``merge``, ⊖ ``remove``
- :mod:`mac_ref.rope`     rotary embedding and its inverse
- :mod:`mac_ref.config`   :class:`MACConfig`, every knob of the method
- :mod:`mac_ref.state`    the per-layer query and summary rings
- :mod:`mac_ref.match`    nearest recent pre-RoPE query, hit test
- :mod:`mac_ref.amend`    band ranges and the reused row ⊕ band
- :mod:`mac_ref.complete` sinks ⊕ C ⊕ tail
- :mod:`mac_ref.decode`   one decode step for a batch, prefill, step statistics
- :mod:`mac_ref.stream`   a whole stream through one layer
- :mod:`mac_ref.oracle`   float64 dense full attention
- :mod:`mac_ref.synthetic` synthetic streams with controllable query reuse
"""

from .amend import Spans, amend, prefix_end, step_spans
from .complete import amend_complete, complete
from .config import MACConfig
from .decode import StepStats, decode_step, prefill
from .match import MatchResult, match
from .oracle import causal_attention, full_attention
from .rope import apply_rope, invert_rope
from .state import LayerState, new_state
from .stream import StreamResult, run_stream
from .synthetic import synthetic_stream
from .summary import Summary, attend, empty_summary, merge, merge_all, remove, removal_epsilon

__all__ = [
    "MACConfig", "LayerState", "new_state", "Summary", "empty_summary", "attend", "merge", "merge_all",
    "remove", "removal_epsilon", "apply_rope", "invert_rope", "MatchResult", "match", "Spans", "prefix_end",
    "step_spans", "amend", "complete", "amend_complete", "StepStats", "decode_step", "prefill",
    "StreamResult", "run_stream", "full_attention", "causal_attention", "synthetic_stream",
]
