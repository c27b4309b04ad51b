//! TODO(lead): forward
