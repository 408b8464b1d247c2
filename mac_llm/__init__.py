"""mac_llm: MAC-Attention in real models, and the `mac-attention` command line."""
