"""lvpipe generate against transformers' generate, and loading against
from_pretrained, on the same model folder and the same threads.

    python benches/peers/generate_peer.py LVPIPE_BIN WORK [THREADS]

WORK gets two Qwen2 folders made by transformers from a config (random
weights, nothing downloaded): `tiny` (fixtures/hf/qwen2-gqa's shape) and
`qwen2-0.5b` (Qwen2-0.5B's config: 24 layers, hidden 896, 14 heads, 2 KV
heads, vocabulary 151,936, tied; bf16, sharded at 200 MB), each with the
Qwen2 tokenizer of fixtures/tokenizers. Both tools decode 32 tokens
greedily from the same prompt tokens; load time and peak RSS are measured
on fresh processes. Prints one JSON line per model and tool.
"""

import json
import os
import resource
import subprocess
import sys
import time

LVPIPE, WORK = sys.argv[1], sys.argv[2]
THREADS = int(sys.argv[3]) if len(sys.argv) > 3 else 2
NEW = 32
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def make(name, **cfg):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = os.path.join(WORK, name)
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**cfg)).eval()
    dtype = cfg.get("torch_dtype")
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path, max_shard_size="200MB")
    tok = os.path.join(os.path.dirname(__file__), "../../fixtures/tokenizers/qwen2.tokenizer.json.zst")
    subprocess.run(["zstd", "-q", "-d", "-f", tok, "-o", os.path.join(path, "tokenizer.json")], check=True)
    return path


def lvpipe(path):
    started = time.perf_counter()
    out = subprocess.run(
        ["/usr/bin/time", "-f", "%M", LVPIPE, "generate", "--model", path, "--raw", "--prompt", PROMPT,
         "--max-new-tokens", str(NEW), "--json"],
        capture_output=True, text=True, check=True,
        env={**os.environ, "RAYON_NUM_THREADS": str(THREADS)},
    )
    total = time.perf_counter() - started
    g = json.loads(out.stdout)
    rss_mb = int(out.stderr.strip().splitlines()[-1]) / 1024
    decode = len(g["tokens"]) / g["tokens_per_second"]
    return g, {"tool": "lvpipe", "tokens_per_s": g["tokens_per_second"], "load_s": total - decode, "peak_rss_mb": rss_mb}


def transformers_side(path, prompt_tokens):
    code = f"""
import json, resource, sys, time, torch
torch.set_num_threads({THREADS})
from transformers import AutoModelForCausalLM
t0 = time.perf_counter()
m = AutoModelForCausalLM.from_pretrained({path!r}, dtype=torch.float32).eval()
load = time.perf_counter() - t0
ids = torch.tensor([{prompt_tokens!r}])
with torch.no_grad():
    t0 = time.perf_counter()
    out = m.generate(ids, max_new_tokens={NEW}, min_new_tokens={NEW}, do_sample=False, pad_token_id=0)
    gen = time.perf_counter() - t0
print(json.dumps({{"load_s": load, "tokens_per_s": {NEW} / gen, "tokens": out[0, ids.shape[1]:].tolist(),
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    os.makedirs(WORK, exist_ok=True)
    models = {
        "tiny": make("tiny", vocab_size=151936, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
        "qwen2-0.5b": make("qwen2-0.5b", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                           num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                           max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=True,
                           torch_dtype=__import__("torch").bfloat16),
    }
    for name, path in models.items():
        g, ours = lvpipe(path)
        theirs = transformers_side(path, g["prompt_tokens"])
        same = sum(a == b for a, b in zip(g["tokens"], theirs.pop("tokens")))
        print(json.dumps({"model": name, "threads": THREADS, **ours, "same_tokens": f"{same}/{NEW}"}))
        print(json.dumps({"model": name, "threads": THREADS, "tool": "transformers", **theirs}))


if __name__ == "__main__":
    main()
