"""Build the Hugging Face CLIP tokenizer files (vocab.json, merges.txt, configs) from OpenAI's BPE merge list.

Single-file checkpoints carry no tokenizer, and we run without a model hub, so the package ships these files
(library/models/tokenizers/clip/). They are regenerated from `bpe_simple_vocab_16e6.txt.gz` (shipped with the
`open-clip-torch` wheel), laid out as HF's CLIP tokenizer expects: the 256 byte symbols, the same with `</w>`, one
token per merge, then the two special tokens (49408 ids in all).

    python tools/build_clip_tokenizer.py --bpe open_clip/bpe_simple_vocab_16e6.txt.gz [--output DIR]
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUTPUT = os.path.join(REPO_ROOT, "library", "models", "tokenizers", "clip")
NUM_MERGES = 49152 - 256 - 2  # as in OpenAI's simple tokenizer: the vocabulary stops at 49408 ids
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table, whose order fixes the first 256 ids."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def build_files(bpe_path: str, output_dir: str) -> None:
    """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json into `output_dir`."""
    with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != 49408:
        raise SystemExit(f"{bpe_path}: expected 49408 distinct tokens, got {len(vocab)}")
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(output_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    with open(os.path.join(output_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special, f, indent=2)
    config = dict(special, model_max_length=77, do_lower_case=True, errors="replace", tokenizer_class="CLIPTokenizer")
    with open(os.path.join(output_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bpe", required=True, help="bpe_simple_vocab_16e6.txt.gz from the open-clip-torch wheel")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="output folder (default: the package's copy)")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.bpe):
        print(f"error: BPE file not found: {args.bpe}", file=sys.stderr)
        return 2
    build_files(args.bpe, args.output)
    print(f"wrote CLIP tokenizer files to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
