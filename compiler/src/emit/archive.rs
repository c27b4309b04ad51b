//! A minimal, deterministic static-archive (`ar`) writer with a symbol index.
//!
//! - GNU (ELF): `/` symbol table (big-endian), `//` long-name table, names ending in `/`.
//! - BSD (Apple): `__.SYMDEF` ranlib table (little-endian), `#1/len` names, members 8-aligned
//!   as Apple's `ld` expects.
//! - COFF (MSVC): the GNU layout plus the second linker member `link.exe` looks up symbols in.
//!
//! All timestamps, uids and gids are 0 and modes 644, so the bytes depend on the input only.

use needle_targets::ArchiveKind;
use object::{Object, ObjectSymbol};

use super::EmitError;

/// One object file in an archive.
#[derive(Clone, Debug)]
pub struct ArchiveMember {
    /// File name (no directories), e.g. `kernels.o`.
    pub name: String,
    pub data: Vec<u8>,
}

const MAGIC: &[u8] = b"!<arch>\n";
const HEADER_LEN: usize = 60;

/// The defined global symbols of an object file, as its symbol table spells them (mangled).
fn defined_globals(m: &ArchiveMember) -> Result<Vec<Vec<u8>>, EmitError> {
    let file = object::File::parse(&*m.data)
        .map_err(|e| EmitError::Archive(format!("archive member `{}`: {e}", m.name)))?;
    let mut out = Vec::new();
    for s in file.symbols() {
        if s.is_global() && !s.is_undefined() {
            let name = s
                .name_bytes()
                .map_err(|e| EmitError::Archive(e.to_string()))?;
            if !name.is_empty() {
                out.push(name.to_vec());
            }
        }
    }
    Ok(out)
}

fn header(out: &mut Vec<u8>, name: &[u8], size: usize) -> Result<(), EmitError> {
    if name.len() > 16 || size > 9_999_999_999 {
        return Err(EmitError::Archive(
            "archive member name or size out of range".into(),
        ));
    }
    let start = out.len();
    out.extend_from_slice(name);
    out.resize(start + 16, b' ');
    // mtime, uid, gid, mode, size: fixed-width decimal/octal text, space padded.
    for (v, w) in [("0", 12), ("0", 6), ("0", 6), ("644", 8)] {
        let at = out.len();
        out.extend_from_slice(v.as_bytes());
        out.resize(at + w, b' ');
    }
    let at = out.len();
    out.extend_from_slice(size.to_string().as_bytes());
    out.resize(at + 10, b' ');
    out.extend_from_slice(b"`\n");
    debug_assert_eq!(out.len() - start, HEADER_LEN);
    Ok(())
}

fn pad_to(out: &mut Vec<u8>, align: usize, fill: u8) {
    out.resize(out.len().next_multiple_of(align), fill);
}

fn too_big() -> EmitError {
    EmitError::Archive("archive larger than 4 GiB".into())
}

fn u32_of(v: usize) -> Result<u32, EmitError> {
    u32::try_from(v).map_err(|_| too_big())
}

/// An archive of `members` in the layout `kind` expects, with a symbol index of every defined
/// global symbol of every member.
pub fn write_archive(kind: ArchiveKind, members: &[ArchiveMember]) -> Result<Vec<u8>, EmitError> {
    let syms: Vec<Vec<Vec<u8>>> = members
        .iter()
        .map(defined_globals)
        .collect::<Result<_, _>>()?;
    match kind {
        ArchiveKind::Gnu => write_gnu(members, &syms, false),
        ArchiveKind::Coff => write_gnu(members, &syms, true),
        ArchiveKind::Bsd => write_bsd(members, &syms),
    }
}

fn write_gnu(
    members: &[ArchiveMember],
    syms: &[Vec<Vec<u8>>],
    coff: bool,
) -> Result<Vec<u8>, EmitError> {
    let nsyms: usize = syms.iter().map(Vec::len).sum();
    let names_len: usize = syms.iter().flatten().map(|s| s.len() + 1).sum();
    let symtab_size = 4 + 4 * nsyms + names_len;
    // Second linker member (COFF): member count, member offsets, symbol count, 1-based member
    // indices, names; symbols sorted by name.
    let second_size = 4 + 4 * members.len() + 4 + 2 * nsyms + names_len;

    // Long names: any member name that does not fit 15 characters plus `/`.
    let mut longnames = Vec::new();
    let mut name_fields = Vec::new();
    for m in members {
        if m.name.is_empty() || m.name.contains('/') || m.name.contains('\n') {
            return Err(EmitError::Archive(format!(
                "bad archive member name `{}`",
                m.name
            )));
        }
        if m.name.len() <= 15 {
            name_fields.push(format!("{}/", m.name).into_bytes());
        } else {
            name_fields.push(format!("/{}", longnames.len()).into_bytes());
            longnames.extend_from_slice(m.name.as_bytes());
            longnames.extend_from_slice(b"/\n");
        }
    }

    let even = |n: usize| n + n % 2;
    let mut offset = MAGIC.len() + HEADER_LEN + even(symtab_size);
    if coff {
        offset += HEADER_LEN + even(second_size);
    }
    if !longnames.is_empty() {
        offset += HEADER_LEN + even(longnames.len());
    }
    let mut member_offsets = Vec::new();
    for m in members {
        member_offsets.push(u32_of(offset)?);
        offset += HEADER_LEN + even(m.data.len());
    }
    u32_of(offset)?;

    let mut out = Vec::with_capacity(offset);
    out.extend_from_slice(MAGIC);
    header(&mut out, b"/", symtab_size)?;
    out.extend_from_slice(&u32_of(nsyms)?.to_be_bytes());
    for (i, s) in syms.iter().enumerate() {
        for _ in s {
            out.extend_from_slice(&member_offsets[i].to_be_bytes());
        }
    }
    for name in syms.iter().flatten() {
        out.extend_from_slice(name);
        out.push(0);
    }
    pad_to(&mut out, 2, b'\n');

    if coff {
        header(&mut out, b"/", second_size)?;
        out.extend_from_slice(&u32_of(members.len())?.to_le_bytes());
        for o in &member_offsets {
            out.extend_from_slice(&o.to_le_bytes());
        }
        let mut sorted: Vec<(&[u8], u16)> = Vec::new();
        for (i, s) in syms.iter().enumerate() {
            let idx = u16::try_from(i + 1).map_err(|_| too_big())?;
            sorted.extend(s.iter().map(|n| (n.as_slice(), idx)));
        }
        sorted.sort();
        out.extend_from_slice(&u32_of(nsyms)?.to_le_bytes());
        for (_, idx) in &sorted {
            out.extend_from_slice(&idx.to_le_bytes());
        }
        for (name, _) in &sorted {
            out.extend_from_slice(name);
            out.push(0);
        }
        pad_to(&mut out, 2, b'\n');
    }

    if !longnames.is_empty() {
        header(&mut out, b"//", longnames.len())?;
        out.extend_from_slice(&longnames);
        pad_to(&mut out, 2, b'\n');
    }
    for (m, name) in members.iter().zip(&name_fields) {
        header(&mut out, name, m.data.len())?;
        out.extend_from_slice(&m.data);
        pad_to(&mut out, 2, b'\n');
    }
    Ok(out)
}

fn write_bsd(members: &[ArchiveMember], syms: &[Vec<Vec<u8>>]) -> Result<Vec<u8>, EmitError> {
    // Names are stored after the header as `#1/len`, padded with NULs so that member data
    // starts 8-aligned (the archive start is 8-aligned and headers are 60 bytes).
    fn name_len(name: &str, header_at: usize) -> usize {
        let data_at = header_at + HEADER_LEN;
        (data_at + name.len() + 1).next_multiple_of(8) - data_at
    }
    let symdef_name = "__.SYMDEF";
    let nsyms: usize = syms.iter().map(Vec::len).sum();
    let mut strtab = Vec::new();
    let mut strx = Vec::new();
    for name in syms.iter().flatten() {
        strx.push(u32_of(strtab.len())?);
        strtab.extend_from_slice(name);
        strtab.push(0);
    }
    strtab.resize(strtab.len().next_multiple_of(8), 0);
    let symdef_body = 4 + 8 * nsyms + 4 + strtab.len();
    let symdef_name_len = name_len(symdef_name, MAGIC.len());
    let pad8 = |n: usize| n.div_ceil(8) * 8;

    let mut offset = MAGIC.len() + HEADER_LEN + symdef_name_len + pad8(symdef_body);
    let mut member_offsets = Vec::new();
    let mut member_name_lens = Vec::new();
    for m in members {
        if m.name.is_empty() || m.name.contains('/') {
            return Err(EmitError::Archive(format!(
                "bad archive member name `{}`",
                m.name
            )));
        }
        member_offsets.push(u32_of(offset)?);
        let nl = name_len(&m.name, offset);
        member_name_lens.push(nl);
        offset += HEADER_LEN + nl + pad8(m.data.len());
    }
    u32_of(offset)?;

    let mut out = Vec::with_capacity(offset);
    out.extend_from_slice(MAGIC);
    let write_name =
        |out: &mut Vec<u8>, name: &str, nl: usize, body: usize| -> Result<(), EmitError> {
            header(out, format!("#1/{nl}").as_bytes(), nl + pad8(body))?;
            let at = out.len();
            out.extend_from_slice(name.as_bytes());
            out.resize(at + nl, 0);
            Ok(())
        };
    write_name(&mut out, symdef_name, symdef_name_len, symdef_body)?;
    out.extend_from_slice(&u32_of(8 * nsyms)?.to_le_bytes());
    let mut k = 0;
    for (i, s) in syms.iter().enumerate() {
        for _ in s {
            out.extend_from_slice(&strx[k].to_le_bytes());
            out.extend_from_slice(&member_offsets[i].to_le_bytes());
            k += 1;
        }
    }
    out.extend_from_slice(&u32_of(strtab.len())?.to_le_bytes());
    out.extend_from_slice(&strtab);
    pad_to(&mut out, 8, 0);
    for (m, &nl) in members.iter().zip(&member_name_lens) {
        write_name(&mut out, &m.name, nl, m.data.len())?;
        out.extend_from_slice(&m.data);
        pad_to(&mut out, 8, 0);
    }
    Ok(out)
}
