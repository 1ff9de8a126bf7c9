"""Train the demo's byte-level BPE (4,096 tokens, <|endoftext|> special) on the demo corpus's training splits.

    python tokenizers/demo/train_tokenizer.py       # writes tokenizers/demo/{vocab.json,merges.txt}

A small vocabulary keeps the demo model (and its bundled checkpoint) a few MB; GPT-2's own 50,257-token BPE
is bundled beside it (tokenizers/gpt2) for real GPT-2 checkpoints.
"""

from pathlib import Path

from tokenizers import ByteLevelBPETokenizer

HERE = Path(__file__).parent
CORPUS = HERE.parents[1] / "fabric_tram" / "assets" / "data" / "demo"
VOCAB_SIZE = 4096

if __name__ == "__main__":
    files = sorted(str(p) for p in CORPUS.glob("*/train.txt"))
    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train(
        files, vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=["<|endoftext|>"], show_progress=False
    )
    tokenizer.save_model(str(HERE))
    print(f"trained on {len(files)} files: vocabulary {tokenizer.get_vocab_size()}")
