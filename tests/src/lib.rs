//! Shared helpers for the end-to-end tests: fixture paths and golden-file readers.
