//! Self-check of an emitted object or archive: standalone (no undefined symbols: nothing from
//! libc, libm or an allocator, no Cranelift libcall) and namespaced (every global symbol starts
//! with the library's prefix). Used by tests and by `needlec build` on its own output.

use object::read::archive::ArchiveFile;
use object::{BinaryFormat, Object, ObjectSymbol};

use super::EmitError;
use crate::abi::FORBIDDEN_LIBCALL_PREFIX;

/// What a successful check found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StandaloneReport {
    /// Defined global symbols, C spelling (the Mach-O leading underscore removed), sorted.
    pub exports: Vec<String>,
    /// Number of object files looked at.
    pub objects: usize,
}

/// Checks an object file or a static archive of them.
pub fn check_standalone(bytes: &[u8], prefix: &str) -> Result<StandaloneReport, EmitError> {
    let mut report = StandaloneReport::default();
    let mut problems = Vec::new();
    if bytes.starts_with(b"!<arch>\n") {
        let ar =
            ArchiveFile::parse(bytes).map_err(|e| EmitError::Check(format!("archive: {e}")))?;
        let mut index = Vec::new();
        if let Some(syms) = ar.symbols().map_err(|e| EmitError::Check(e.to_string()))? {
            for s in syms {
                let s = s.map_err(|e| EmitError::Check(e.to_string()))?;
                index.push(String::from_utf8_lossy(s.name()).into_owned());
            }
        } else {
            problems.push("archive has no symbol index".to_string());
        }
        let mut defined = Vec::new();
        for m in ar.members() {
            let m = m.map_err(|e| EmitError::Check(e.to_string()))?;
            let name = String::from_utf8_lossy(m.name()).into_owned();
            let data = m.data(bytes).map_err(|e| EmitError::Check(e.to_string()))?;
            check_object(
                &name,
                data,
                prefix,
                &mut report,
                &mut problems,
                &mut defined,
            )?;
        }
        index.sort();
        defined.sort();
        if index != defined {
            problems.push(format!(
                "archive index {index:?} does not match the defined symbols {defined:?}"
            ));
        }
    } else {
        check_object(
            "object",
            bytes,
            prefix,
            &mut report,
            &mut problems,
            &mut Vec::new(),
        )?;
    }
    if !problems.is_empty() {
        return Err(EmitError::Check(format!(
            "output is not standalone:\n  {}",
            problems.join("\n  ")
        )));
    }
    report.exports.sort();
    Ok(report)
}

fn check_object(
    what: &str,
    data: &[u8],
    prefix: &str,
    report: &mut StandaloneReport,
    problems: &mut Vec<String>,
    defined: &mut Vec<String>,
) -> Result<(), EmitError> {
    let file = object::File::parse(data).map_err(|e| EmitError::Check(format!("{what}: {e}")))?;
    report.objects += 1;
    let mangle = if file.format() == BinaryFormat::MachO {
        "_"
    } else {
        ""
    };
    for s in file.symbols() {
        let raw = s.name().map_err(|e| EmitError::Check(e.to_string()))?;
        if s.is_undefined() {
            if raw.is_empty() {
                continue; // ELF's null symbol
            }
            let why = if raw.contains(FORBIDDEN_LIBCALL_PREFIX) {
                " (a Cranelift libcall: an instruction this target lowers to a library call)"
            } else {
                ""
            };
            problems.push(format!("{what}: undefined symbol `{raw}`{why}"));
        } else if s.is_global() {
            defined.push(raw.to_string());
            let c_name = raw.strip_prefix(mangle).unwrap_or(raw);
            if !c_name.starts_with(prefix) {
                problems.push(format!(
                    "{what}: global symbol `{raw}` lacks the prefix `{prefix}`"
                ));
            }
            report.exports.push(c_name.to_string());
        }
    }
    Ok(())
}
