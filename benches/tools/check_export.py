"""Checks that transformers loads an lvpipe export (a Qwen2 folder) with no
custom code and computes the logits in REFERENCE (a fixtures/hf
reference.json) to 1e-4. Run by trainer/tests/hf.rs where
LVPIPE_REFERENCE_PYTHON names a Python with torch and transformers.

    python check_export.py EXPORT_DIR REFERENCE_JSON
"""

import json
import sys

import torch
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained(sys.argv[1], attn_implementation="eager").eval()
assert type(model).__name__ == "Qwen2ForCausalLM", type(model).__name__
ref = json.load(open(sys.argv[2]))
with torch.no_grad():
    logits = model(torch.tensor([ref["input_ids"]])).logits[0].flatten()
worst = (logits - torch.tensor(ref["logits"])).abs().max().item()
print(f"{sys.argv[1]}: largest logit difference {worst:.2e}")
sys.exit(0 if worst <= 1e-4 else 1)
