"""Train the two SentencePiece tokenizers the Needle 3 golden vectors use.

The cactus-needle wheel ships no tokenizer model (it downloads one from Hugging Face at run
time), so the golden vectors use tokenizers trained here with the package's conventions:
BPE, byte fallback, identity normalization, pad 0 / eos 1 / bos 2 / unk 3, and the package's
16 chat markers (needle/model/tokenizer.py CHAT_MARKERS) as user-defined symbols, ids 4..19.
The corpus is every example of /work/shared/finetune/train.jsonl rendered with the package's
own render_example (prompt + target). Run by hand; the outputs are committed.

    /work/venv-n3/bin/python scripts/needle3/make_tokenizer.py
"""
import json
import os
import sys
import tempfile

import sentencepiece as spm

from needle.model.finetune import render_example
from needle.model.tokenizer import CHAT_MARKERS

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "..", "tests", "fixtures", "needle3")
DATA = sys.argv[1] if len(sys.argv) > 1 else "/work/shared/finetune/train.jsonl"


def main():
    lines = []
    with open(DATA, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                prompt, target = render_example(json.loads(line))
                lines.append((prompt + target).replace("\n", " "))
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.txt")
        with open(corpus, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        for vocab, name in ((2048, "n3tok2k"), (8192, "n3tok8k")):
            spm.SentencePieceTrainer.Train(
                input=corpus, model_prefix=os.path.join(OUT, name), model_type="bpe",
                vocab_size=vocab, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
                user_defined_symbols=CHAT_MARKERS, byte_fallback=True,
                normalization_rule_name="identity", remove_extra_whitespaces=False,
                split_digits=False, num_threads=1, shuffle_input_sentence=False,
                input_sentence_size=0, character_coverage=1.0, minloglevel=2)
            os.remove(os.path.join(OUT, name + ".vocab"))


if __name__ == "__main__":
    main()
