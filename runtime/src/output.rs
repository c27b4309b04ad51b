//! Output post-processing (spec section 3, "Output").
