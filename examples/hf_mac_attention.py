"""Switch a Hugging Face Llama-family model to MAC-Attention decoding in a few lines.

    python examples/hf_mac_attention.py

Uses SmolLM2-135M-Instruct built from the demo's GGUF file (no download); with your own
model, start from `AutoModelForCausalLM.from_pretrained(...)` instead of `smollm2_hf()`.
"""

import torch

from mac_core import preset
from mac_llm.decoding import default_prose
from mac_llm.hf import disable_mac_attention, enable_mac_attention, smollm2_hf

model, tokenizer = smollm2_hf()
prompt = tokenizer(default_prose()[:6000], return_tensors="pt").input_ids[:, :1024]

with torch.no_grad():
    full = model.generate(prompt, max_new_tokens=32, do_sample=False)

# the three lines that matter: pick a configuration, switch, generate as usual
config = preset("demo")  # the demo's configuration (mac_core.config.PRESETS)
mac = enable_mac_attention(model, config)
with torch.no_grad():
    out = model.generate(prompt, max_new_tokens=32, do_sample=False)

stats = mac.layer_stats()  # fields [steps, layers, batch, query heads]
print(f"hit rate {stats.hit_rate:.1%}, KV reads skipped {stats.skipped_fraction:.1%}")
print("same tokens as full attention:", torch.equal(out, full))
print(repr(tokenizer.decode(out[0, prompt.shape[1]:])))
disable_mac_attention(model)  # back to the model's own attention
