"""mac_triton: the Triton fast path of MAC-Attention, twin of mac_ref stage by stage."""
