"""Load a checkpoint written by our trainer with transformers and compare its logits with ours.

Usage: python hf_check_checkpoint.py CHECKPOINT_DIR JAMBA_BIN
Runs transformers' JambaForCausalLM (f32, CPU) and `jamba forward --backend ndarray` on the same
tokens and prints the max-abs error relative to max(1, max|logit|).
"""
import subprocess
import sys
import tempfile

import torch
from safetensors.numpy import load_file, save_file
from transformers import JambaForCausalLM

ckpt, jamba = sys.argv[1], sys.argv[2]
model = JambaForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
vocab = model.config.vocab_size
ids = torch.randint(3, vocab, (2, 40), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    ref = model(input_ids=ids).logits.numpy().astype("float64")
with tempfile.TemporaryDirectory() as d:
    save_file({"input_ids": ids.numpy()}, f"{d}/in.safetensors")
    subprocess.run([jamba, "forward", "--model", ckpt, "--input", f"{d}/in.safetensors",
                    "--output", f"{d}/out.safetensors", "--backend", "ndarray"], check=True)
    ours = load_file(f"{d}/out.safetensors")["logits"].astype("float64")
scale = max(1.0, abs(ref).max())
print(f"transformers loads {ckpt}: {sum(p.numel() for p in model.parameters())} parameters; "
      f"ours vs transformers logits: max-abs/scale {abs(ours - ref).max() / scale:.2e}")
