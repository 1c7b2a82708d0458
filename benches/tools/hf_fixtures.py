"""Writes fixtures/hf/: tiny random Hugging Face models saved by transformers
itself, with the outputs transformers computes for fixed inputs, for
lvpipe's loading tests (tests/hf.rs) to match.

Made once on a developer machine; CI only reads the outputs:

    python3 -m venv venv && venv/bin/pip install torch==2.15.0 transformers==5.24.0
    venv/bin/python benches/tools/hf_fixtures.py fixtures/hf

- qwen2-gqa/: Qwen2ForCausalLM, grouped-query heads (4 query, 2 key/value),
  untied, rope_scaling linear x2, saved in shards with
  model.safetensors.index.json.
- qwen2-tied/: tied embeddings, weights stored in bf16 (the reference is the
  f32 model those bf16 weights make), transformers 5's rope_parameters.
- qwen2-yarn/, qwen2-dynamic/: rope_scaling yarn and dynamic.
- siglip/: SiglipVisionModel without the pooling head.
- vila/: VILA's folder layout (llm/, vision_tower/, mm_projector/ and the
  top config.json) over the two above and an mlp_downsample projector.

Each folder's reference.json holds the inputs and outputs: logits of a token
sequence, greedy continuations, vision hidden states of a fixed image, and
for vila/ the logits of a prompt with the image's projected tokens spliced
in where VILA puts them.
"""

import json
import os
import sys

import torch
import transformers
from safetensors.torch import save_file
from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

VOCAB = 96
PROMPT = [5, 17, 33, 2, 61, 8, 90, 14, 40, 3]


def qwen2(tie, rope, max_positions=64):
    torch.manual_seed(1 if tie else 0)
    cfg = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie,
        attn_implementation="eager",
        **rope,
    )
    model = Qwen2ForCausalLM(cfg).eval()
    # Random init leaves biases at 0: give them values, so loading them matters.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)
    return model


def llm_reference(model):
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        logits = model(ids).logits[0]
        greedy = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    return {
        "input_ids": PROMPT,
        "logits": logits.flatten().tolist(),
        "logits_shape": list(logits.shape),
        "greedy": greedy[0, len(PROMPT):].tolist(),
    }


def siglip():
    torch.manual_seed(2)
    cfg = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=35,
        patch_size=7,
        vision_use_head=False,
    )
    model = SiglipVisionModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.2)
    return model


def image():
    g = torch.Generator().manual_seed(3)
    return torch.rand((1, 3, 35, 35), generator=g) * 2 - 1


def flat_square(x):
    """VILA's DownSampleBlock.flat_square (llava/model/multimodal_projector/base_projector.py)."""
    n, w, h, c = x.size()
    if w % 2 == 1:
        x = torch.concat([x, torch.zeros((n, 1, h, c), dtype=x.dtype)], dim=1).contiguous()
        n, w, h, c = x.size()
    if h % 2 == 1:
        x = torch.concat([x, torch.zeros((n, w, 1, c), dtype=x.dtype)], dim=2).contiguous()
        n, w, h, c = x.size()
    x = x.view(n, w, int(h / 2), int(c * 2))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h / 2), int(w / 2), int(c * 4))
    return x


class Projector(torch.nn.Module):
    """VILA's mlp_downsample: its state dict names are `layers.{1,2,4}.*`."""

    def __init__(self, vision, hidden):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Identity(),
            torch.nn.LayerNorm(vision * 4),
            torch.nn.Linear(vision * 4, hidden),
            torch.nn.GELU(),
            torch.nn.Linear(hidden, hidden),
        )

    def forward(self, features):
        n, p, c = features.shape
        side = int(p**0.5)
        x = flat_square(features.contiguous().reshape(n, side, side, c))
        return self.layers(x.reshape(n, -1, x.shape[-1]))


def save(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)
        f.write("\n")


def main(out):
    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    os.makedirs(out, exist_ok=True)

    gqa = qwen2(False, {"rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 10000.0})
    gqa.save_pretrained(f"{out}/qwen2-gqa", max_shard_size="40KB")
    save(f"{out}/qwen2-gqa/reference.json", {**versions, **llm_reference(gqa)})

    tied = qwen2(True, {"rope_theta": 50000.0})
    # Saved in bf16; the reference is the f32 model of those bf16 values
    # (`Module.to` converts in place).
    tied.to(torch.bfloat16).save_pretrained(f"{out}/qwen2-tied")
    tied.to(torch.float32)
    save(f"{out}/qwen2-tied/reference.json", {**versions, **llm_reference(tied)})

    # RoPE scaling as transformers computes it: YaRN past an original
    # context of 8, and dynamic NTK growing its base past 8 positions (the
    # prompt and every decoded token are past it).
    for name, rope in [
        ("qwen2-yarn", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                         "original_max_position_embeddings": 8}}),
        ("qwen2-dynamic", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}),
    ]:
        model = qwen2(False, {**rope, "rope_theta": 10000.0}, max_positions=8 if "dynamic" in name else 32)
        model.save_pretrained(f"{out}/{name}")
        save(f"{out}/{name}/reference.json", {**versions, **llm_reference(model)})

    vision = siglip()
    vision.save_pretrained(f"{out}/siglip")
    px = image()
    with torch.no_grad():
        states = vision(pixel_values=px, output_hidden_states=True)
    save(
        f"{out}/siglip/reference.json",
        {
            **versions,
            "pixels": px.flatten().tolist(),
            "hidden_states": [h[0].flatten().tolist() for h in states.hidden_states],
            "last_hidden_state": states.last_hidden_state[0].flatten().tolist(),
        },
    )

    # A VILA folder: the models above as its parts, with a projector.
    torch.manual_seed(4)
    projector = Projector(32, 32).eval()
    with torch.no_grad():
        for name, p in projector.named_parameters():
            p.normal_(1.0 if name == "layers.1.weight" else 0.0, 0.3)
    vila = f"{out}/vila"
    gqa.save_pretrained(f"{vila}/llm")
    vision.save_pretrained(f"{vila}/vision_tower")
    os.makedirs(f"{vila}/mm_projector", exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in projector.state_dict().items()},
        f"{vila}/mm_projector/model.safetensors",
        metadata={"format": "pt"},
    )
    save(
        f"{vila}/mm_projector/config.json",
        {"architectures": ["MultimodalProjector"], "model_type": "v2l_projector", "mm_projector_type": "mlp_downsample"},
    )
    top = {
        "architectures": ["LlavaLlamaModel"],
        "model_type": "llava_llama",
        "llm_cfg": json.loads(gqa.config.to_json_string()),
        "vision_tower_cfg": json.loads(vision.config.to_json_string()),
        "mm_projector_cfg": {"mm_projector_type": "mlp_downsample", "model_type": "v2l_projector"},
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "cls_patch",
        "hidden_size": 32,
        "mm_hidden_size": 32,
        "image_aspect_ratio": "resize",
    }
    save(f"{vila}/config.json", top)
    # The prompt with one image: tokens before it, its projected tokens, tokens after.
    before, after = PROMPT[:3], PROMPT[3:]
    with torch.no_grad():
        features = vision(pixel_values=px, output_hidden_states=True).hidden_states[-2]
        media = projector(features)[0]
        emb = gqa.get_input_embeddings()
        embeds = torch.cat([emb(torch.tensor(before)), media, emb(torch.tensor(after))])[None]
        logits = gqa(inputs_embeds=embeds).logits[0]
    save(
        f"{vila}/reference.json",
        {
            **versions,
            "before": before,
            "after": after,
            "pixels": px.flatten().tolist(),
            "projected": media.flatten().tolist(),
            "logits": logits.flatten().tolist(),
            "logits_shape": list(logits.shape),
        },
    )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "fixtures/hf")
