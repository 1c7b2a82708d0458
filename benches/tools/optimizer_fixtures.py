"""Reference values for lvpipe's optimizers from Hugging Face's Adafactor.

Writes fixtures/optim/adafactor.json: a matrix and a vector parameter, the
gradients of three steps, and the parameters after each step, as
`transformers.optimization.Adafactor(lr=0.01, relative_step=False,
scale_parameter=False, warmup_init=False, weight_decay=0.1)` computes them.
Run once with torch and transformers installed:

    python benches/tools/optimizer_fixtures.py
"""

import json
import pathlib

import torch
from transformers.optimization import Adafactor

torch.manual_seed(0)
out = pathlib.Path(__file__).resolve().parents[2] / "fixtures" / "optim" / "adafactor.json"
params = {
    "matrix": torch.randn(3, 4) * 0.5,
    "vector": torch.randn(5) * 0.5,
}
grads = [{k: torch.randn_like(v) * 0.1 * (s + 1) for k, v in params.items()} for s in range(3)]
tensors = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
opt = Adafactor(
    list(tensors.values()),
    lr=0.01,
    relative_step=False,
    scale_parameter=False,
    warmup_init=False,
    weight_decay=0.1,
)
after = []
for g in grads:
    for k, p in tensors.items():
        p.grad = g[k].clone()
    opt.step()
    after.append({k: p.detach().flatten().tolist() for k, p in tensors.items()})
fixture = {
    "settings": {"lr": 0.01, "weight_decay": 0.1},
    "shapes": {k: list(v.shape) for k, v in params.items()},
    "start": {k: v.flatten().tolist() for k, v in params.items()},
    "grads": [{k: v.flatten().tolist() for k, v in g.items()} for g in grads],
    "after": after,
}
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(fixture, indent=1) + "\n")
print(f"wrote {out}")
