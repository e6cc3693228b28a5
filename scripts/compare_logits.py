"""Compare `jamba forward` logits with a fixture's transformers logits.

Usage: python compare_logits.py EXPECTED.safetensors LOGITS.safetensors
Prints the max-abs error relative to max(1, max|ref|) and the relative L2 error.
"""
import sys

from safetensors.numpy import load_file

exp = load_file(sys.argv[1])["logits"].astype("float64")
got = load_file(sys.argv[2])["logits"].astype("float64")
assert exp.shape == got.shape, (exp.shape, got.shape)
scale = max(1.0, abs(exp).max())
max_rel = abs(got - exp).max() / scale
l2_rel = ((got - exp) ** 2).sum() ** 0.5 / (exp**2).sum() ** 0.5
print(f"max-abs/scale {max_rel:.2e}  relative-L2 {l2_rel:.2e}")
