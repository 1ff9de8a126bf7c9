"""Train the sentence-pair sample's tokenizer: an XLM-R-style unigram (SentencePiece-like) vocabulary with XLM-R's
special tokens and pair template (<s> A </s></s> B </s>), on the bundled NLI sample pairs (all four languages).

    python tokenizers/nli-sample/train_tokenizer.py     # writes tokenizers/nli-sample/tokenizer.json

It exists so that the encoder's smoke runs and tests encode pairs exactly as an XLM-R checkpoint's tokenizer.json
does (normaliser, pre-tokeniser, post-processor) without XLM-R's 17 MB vocabulary; the tiny encoder preset's
vocab_size equals its size.
"""

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

HERE = Path(__file__).parent
PAIRS = HERE.parents[1] / "fabric_tram" / "assets" / "data" / "nli-sample"
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # XLM-R's ids 0-3
VOCAB_SIZE = 512

if __name__ == "__main__":
    texts = []
    for path in sorted(PAIRS.glob("*/*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            texts += [record["premise"], record["hypothesis"]]
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIALS, unk_token="<unk>")
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    tokenizer.save(str(HERE / "tokenizer.json"))
    print(f"trained on {len(texts)} sentences: vocabulary {tokenizer.get_vocab_size()}")
