//! SentencePiece BPE tokenizer (spec section 4).
