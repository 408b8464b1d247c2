"""Switch a Hugging Face Llama-family model to MAC-Attention decoding in a few lines.

    python examples/hf_mac_attention.py

Decodes a batch of three prompts of different lengths (left-padded) with full attention,
then with MAC, and prints each request's hit rate and KV reads skipped. Uses
SmolLM2-135M-Instruct built from the demo's GGUF file (no download); with your own model,
start from `AutoModelForCausalLM.from_pretrained(...)` instead of `smollm2_hf()` (or load
it with `attn_implementation="mac"` once `mac_llm.hf` is imported: the demo preset).
"""

import torch

from mac_core import preset
from mac_llm.decoding import default_prose
from mac_llm.hf import disable_mac_attention, enable_mac_attention, smollm2_hf

model, tokenizer = smollm2_hf()
tokenizer.padding_side = "left"  # MAC reads each request's keys from its first real slot on
prose = tokenizer(default_prose()[:20000]).input_ids
texts = [tokenizer.decode(prose[start : start + n]) for start, n in ((0, 1024), (1500, 700), (3000, 400))]
batch = tokenizer(texts, return_tensors="pt", padding=True)
new_tokens = 32


def generate():
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)


full = generate()

# the three lines that matter: pick a configuration, switch, generate as usual
config = preset("demo")  # the demo's configuration (mac_core.config.PRESETS)
mac = enable_mac_attention(model, config)
out = generate()

L = batch.input_ids.shape[1]
print(f"{config.describe()}; {new_tokens} new tokens per request")
print("request  prompt  hit rate  reads skipped (head / KV group)  same tokens as full attention")
for b, stats in enumerate(mac.request_stats()):  # over all layers and decode steps of this generate call
    prompt_len = int(batch.attention_mask[b].sum())
    same = torch.equal(out[b, L:], full[b, L:])
    print(f"{b:7d}  {prompt_len:6d}  {stats['hit_rate']:8.1%}  {stats['skipped_head']:13.1%} / {stats['skipped_group']:.1%}  {same}")
print(repr(tokenizer.decode(out[0, L:])))
disable_mac_attention(model)  # back to the model's own attention
