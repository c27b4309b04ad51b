//! TODO(lead): model
