//! Grammar-constrained decoding (spec section 5).
