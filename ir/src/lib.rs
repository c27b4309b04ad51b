//! The needlec IR.
