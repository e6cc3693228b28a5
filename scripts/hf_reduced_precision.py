"""How far transformers' own bf16/f16 forward is from its f32 fixture logits (the floor for ours).

Usage (where torch and transformers are installed): python hf_reduced_precision.py [cuda|cpu]
"""
import sys

import torch
from safetensors.numpy import load_file
from transformers import JambaForCausalLM

device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
for case in ["tiny-a", "tiny-b", "v01-shape"]:
    exp = load_file(f"tests/fixtures/{case}/expected.safetensors")
    ids = torch.from_numpy(exp["input_ids"]).to(device)
    mask = torch.from_numpy(exp["attention_mask"]).to(device)
    ref = exp["logits"].astype("float64")
    for dtype in [torch.bfloat16, torch.float16]:
        model = JambaForCausalLM.from_pretrained(f"tests/fixtures/{case}", dtype=dtype).to(device).eval()
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask if (mask == 0).any() else None).logits
        got = out.float().cpu().numpy().astype("float64")
        scale = max(1.0, abs(ref).max())
        l2 = ((got - ref) ** 2).sum() ** 0.5 / (ref**2).sum() ** 0.5
        print(f"transformers {case} {device} {dtype}: max-abs/scale {abs(got - ref).max() / scale:.2e}  relative-L2 {l2:.2e}")
