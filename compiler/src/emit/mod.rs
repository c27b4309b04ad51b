//! Emission: static archives of the generated object ([`archive`]), the self-check that an
//! output is standalone ([`check`]), and the Apple XCFramework folder ([`xcframework`]). The object and the header text come from codegen; this
//! module only packages and checks bytes, so it knows nothing of models or of code generation.
//!
//! Everything written here is deterministic: same input, same bytes (no timestamps, user ids or
//! hash-ordered tables).

pub mod archive;
pub mod check;
pub mod xcframework;

pub use archive::{write_archive, ArchiveMember};
pub use check::{check_standalone, StandaloneReport};

/// Errors from packaging or checking an output.
#[derive(Debug, thiserror::Error)]
pub enum EmitError {
    /// A member name or size the archive format cannot hold.
    #[error("writing the archive: {0}")]
    Archive(String),
    /// An object or archive that cannot be read, or that is not standalone.
    #[error("checking the output: {0}")]
    Check(String),
}
