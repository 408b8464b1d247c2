"""mac_triton: the Triton fast path of MAC-Attention, twin of :mod:`mac_ref` stage by stage.

Same signatures and the same state layout (:class:`mac_ref.state.LayerState`); set
``TRITON_INTERPRET=1`` before importing to run the kernels on a CPU.

- :mod:`mac_triton.summary`  ⊕ ``merge``, ``merge_all``, ⊖ ``remove`` over batches
- :mod:`mac_triton.match`    ring scan, argmin (ties to the most recent), hit flag
- :mod:`mac_triton.complete` ``amend_complete``: split-KV decode attention + cached row
- :mod:`mac_triton.decode`   ``decode_step`` (fused step, ring write) and ``full_decode``
"""

from .complete import amend_complete
from .decode import decode_step, full_decode, mac_step
from .match import match
from .summary import merge, merge_all, remove

__all__ = ["merge", "merge_all", "remove", "match", "amend_complete", "decode_step", "full_decode", "mac_step"]
