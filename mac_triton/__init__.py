"""mac_triton: the Triton fast path of MAC-Attention, twin of :mod:`mac_ref` stage by stage.

Same signatures, the same contract (:mod:`mac_core`: configuration, state layout, result
types, validation) and no import of the reference's algorithm; set ``TRITON_INTERPRET=1``
before importing to run the kernels on a CPU. One file per concern:

- :mod:`mac_triton.summary`  ⊕ ``merge``, ``merge_all``, ⊖ ``remove`` over batches, FlashInfer's ``merge_state``
- :mod:`mac_triton.match`    ring scan, argmin (ties to the most recent), the distance test
- :mod:`mac_triton.plan`     the in-kernel work plan: union spans per GQA group, stream-K split
- :mod:`mac_triton.attend`   the attend kernel: split-KV partial states per unit
- :mod:`mac_triton.accept`   the acceptance rule, per head
- :mod:`mac_triton.reduce`   the reduce kernel: ⊕ of the partials, cached row, ring write, report
- :mod:`mac_triton.complete` ``amend_complete``: attend + reduce for given decisions
- :mod:`mac_triton.decode`   ``decode_step``, ``full_decode`` and their graph-capturable kernels ``mac_step``, ``full_step``
- :mod:`mac_triton.verify`   ``verify_attention`` and its capturable ``verify_step``: a block of queries per request, each KV group's keys read once
- :mod:`mac_triton.ops`      ``mac_step`` and ``full_step`` as ``torch.library`` custom ops (``torch.compile``, CUDA graphs)
- :mod:`mac_triton.launch`   launch settings (tiles, warps, programs per SM), passed to the launchers
- :mod:`mac_triton.numerics` the log-domain helpers the kernels share, the accepted dtypes
"""

from mac_core import MACConfig, PagedKV, PageTable, to_paged

from .complete import amend_complete
from .decode import DecodeWorkspace, decode_step, full_decode, full_step, mac_step
from .launch import MATCH, NARROW, WIDE, Launch, MatchLaunch, launch_for, match_launch_for
from .match import find_match
from . import ops
from .summary import merge, merge_all, merge_state, remove
from .verify import verify_attention, verify_step

__all__ = [
    "MACConfig", "PagedKV", "PageTable", "to_paged", "merge", "merge_state", "merge_all", "remove", "find_match", "amend_complete", "decode_step", "full_decode",
    "mac_step", "full_step", "DecodeWorkspace", "Launch", "MatchLaunch", "WIDE", "NARROW", "MATCH", "launch_for", "match_launch_for",
    "verify_attention", "verify_step",
]  # fmt: skip
