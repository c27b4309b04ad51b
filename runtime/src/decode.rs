//! TODO(lead): decode
