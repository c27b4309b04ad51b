//! Emission: object files ([`object`]), static archives ([`archive`]), C headers ([`header`]),
//! and the self-check that an output is standalone ([`check`]).
//!
//! Everything written here is deterministic: same input, same bytes (no timestamps, user ids or
//! hash-ordered tables).

pub mod archive;
pub mod check;
pub mod header;
pub mod object;

pub use archive::{write_archive, ArchiveMember};
pub use check::{check_standalone, StandaloneReport};
pub use header::{write_header, CFunction, CType};
