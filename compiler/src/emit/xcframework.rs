//! `needlec build --emit xcframework`: the standard XCFramework folder an Xcode or Swift Package
//! Manager project links, assembled from the libraries of the Apple targets, and a
//! `Package.swift` that uses it.
//!
//! ```text
//! NAME.xcframework/
//!   Info.plist                          AvailableLibraries: one entry per slice
//!   ios-arm64/libNAME.a                 aarch64-apple-ios
//!   ios-arm64/Headers/NAME.h, module.modulemap
//!   macos-arm64_x86_64/libNAME.a        aarch64-apple-darwin + x86_64-apple-darwin (a fat archive)
//!   macos-arm64_x86_64/Headers/NAME.h, module.modulemap
//! Package.swift                         .binaryTarget(name: "NAME", path: "NAME.xcframework")
//! ```
//!
//! An XCFramework holds one library per platform (and variant), so the two macOS architectures
//! share one universal ("fat") archive, written here as `lipo -create` does. Swift imports the
//! C interface as module `NAME` (the module map). Nothing here needs an Apple machine; nothing
//! here can be run without one either (the tests check the structure and parse the plist).

use std::path::{Path, PathBuf};

/// One slice of the framework: a platform and the targets whose libraries it holds.
pub struct SliceSpec {
    /// `LibraryIdentifier` and the folder name.
    pub identifier: &'static str,
    /// `SupportedPlatform`.
    pub platform: &'static str,
    /// `(target triple, SupportedArchitectures entry)`.
    pub targets: &'static [(&'static str, &'static str)],
}

/// The slices, from the Apple targets needlec supports (no iOS simulator target yet).
pub const SLICES: &[SliceSpec] = &[
    SliceSpec {
        identifier: "ios-arm64",
        platform: "ios",
        targets: &[("aarch64-apple-ios", "arm64")],
    },
    SliceSpec {
        identifier: "macos-arm64_x86_64",
        platform: "macos",
        targets: &[
            ("aarch64-apple-darwin", "arm64"),
            ("x86_64-apple-darwin", "x86_64"),
        ],
    },
];

/// Deployment minimums the code is built for (the Apple targets' test toolchains use the same).
pub const IOS_MIN: &str = "14";
pub const MACOS_MIN: &str = "11";

/// One target's library, ready to go into a slice.
pub struct Built {
    pub triple: &'static str,
    /// The static library (BSD `ar`) for the triple.
    pub archive: Vec<u8>,
    pub header: String,
}

#[derive(Debug, thiserror::Error)]
pub enum XcframeworkError {
    #[error(
        "the headers generated for {0} and {1} differ, so they cannot share the {2} slice of the \
         XCFramework (a needlec bug: please report it)"
    )]
    HeaderMismatch(String, String, String),
    #[error("no library was built for {0}, which the {1} slice needs (a needlec bug)")]
    Missing(String, String),
    #[error("cannot write {path}: {cause}")]
    Write {
        path: PathBuf,
        cause: std::io::Error,
    },
}

/// Mach-O CPU type and subtype of an architecture name (`<mach/machine.h>`).
fn cpu(arch: &str) -> (u32, u32) {
    match arch {
        "arm64" => (0x0100_000c, 0),
        "x86_64" => (0x0100_0007, 3),
        _ => unreachable!("no Apple slice holds {arch}"),
    }
}

/// Alignment of each member of a fat file, as a power of two (lipo's page alignment).
const FAT_ALIGN_LOG2: u32 = 14;

/// A universal file holding `members` (`(arch, bytes)`), laid out as `lipo -create` writes it:
/// a big-endian `fat_header`, one `fat_arch` per member, then each member page-aligned.
pub fn fat_file(members: &[(&str, &[u8])]) -> Vec<u8> {
    let align = 1usize << FAT_ALIGN_LOG2;
    let mut out = Vec::new();
    out.extend(0xcafe_babe_u32.to_be_bytes());
    out.extend((members.len() as u32).to_be_bytes());
    let mut offset = (8 + 20 * members.len()).next_multiple_of(align);
    let mut offsets = Vec::new();
    for (arch, bytes) in members {
        let (cputype, subtype) = cpu(arch);
        for v in [
            cputype,
            subtype,
            offset as u32,
            bytes.len() as u32,
            FAT_ALIGN_LOG2,
        ] {
            out.extend(v.to_be_bytes());
        }
        offsets.push(offset);
        offset = (offset + bytes.len()).next_multiple_of(align);
    }
    for ((_, bytes), at) in members.iter().zip(offsets) {
        out.resize(at, 0);
        out.extend_from_slice(bytes);
    }
    out
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// `Info.plist` of `NAME.xcframework` (XML property list, format version 1.0).
pub fn info_plist(name: &str) -> String {
    let mut s = String::from(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
         <!DOCTYPE plist PUBLIC \"-//Apple//DTD PLIST 1.0//EN\" \
         \"http://www.apple.com/DTDs/PropertyList-1.0.dtd\">\n\
         <plist version=\"1.0\">\n<dict>\n\t<key>AvailableLibraries</key>\n\t<array>\n",
    );
    for slice in SLICES {
        s.push_str("\t\t<dict>\n");
        s.push_str("\t\t\t<key>HeadersPath</key>\n\t\t\t<string>Headers</string>\n");
        s.push_str(&format!(
            "\t\t\t<key>LibraryIdentifier</key>\n\t\t\t<string>{}</string>\n",
            slice.identifier
        ));
        s.push_str(&format!(
            "\t\t\t<key>LibraryPath</key>\n\t\t\t<string>lib{}.a</string>\n",
            xml_escape(name)
        ));
        s.push_str("\t\t\t<key>SupportedArchitectures</key>\n\t\t\t<array>\n");
        for (_, arch) in slice.targets {
            s.push_str(&format!("\t\t\t\t<string>{arch}</string>\n"));
        }
        s.push_str("\t\t\t</array>\n");
        s.push_str(&format!(
            "\t\t\t<key>SupportedPlatform</key>\n\t\t\t<string>{}</string>\n",
            slice.platform
        ));
        s.push_str("\t\t</dict>\n");
    }
    s.push_str(
        "\t</array>\n\t<key>CFBundlePackageType</key>\n\t<string>XFWK</string>\n\
         \t<key>XCFrameworkFormatVersion</key>\n\t<string>1.0</string>\n</dict>\n</plist>\n",
    );
    s
}

/// `module.modulemap`: Swift's `import NAME` sees the C interface of `NAME.h`.
pub fn module_map(name: &str) -> String {
    format!("module {name} {{\n    header \"{name}.h\"\n    export *\n}}\n")
}

/// `Package.swift`: a Swift package whose library product is the XCFramework.
pub fn package_swift(name: &str) -> String {
    format!(
        "// swift-tools-version:5.3\n\
         // Generated by `needlec build --emit xcframework`: the model as a Swift package.\n\
         // Add this folder as a package dependency, then `import {name}` and call\n\
         // `{name}_call_ex` (see {name}.xcframework/*/Headers/{name}.h).\n\
         import PackageDescription\n\
         \n\
         let package = Package(\n\
         \x20   name: \"{name}\",\n\
         \x20   platforms: [.iOS(\"{IOS_MIN}.0\"), .macOS(\"{MACOS_MIN}.0\")],\n\
         \x20   products: [.library(name: \"{name}\", targets: [\"{name}\"])],\n\
         \x20   targets: [.binaryTarget(name: \"{name}\", path: \"{name}.xcframework\")]\n\
         )\n"
    )
}

fn write(path: PathBuf, bytes: &[u8], written: &mut Vec<PathBuf>) -> Result<(), XcframeworkError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|cause| XcframeworkError::Write {
            path: dir.to_path_buf(),
            cause,
        })?;
    }
    std::fs::write(&path, bytes).map_err(|cause| XcframeworkError::Write {
        path: path.clone(),
        cause,
    })?;
    written.push(path);
    Ok(())
}

/// Writes `NAME.xcframework/` (replacing an older one) and `Package.swift` into `out_dir` from
/// the libraries of every target [`SLICES`] names. Returns the files written.
pub fn assemble(
    out_dir: &Path,
    name: &str,
    built: &[Built],
) -> Result<Vec<PathBuf>, XcframeworkError> {
    let root = out_dir.join(format!("{name}.xcframework"));
    if root.exists() {
        std::fs::remove_dir_all(&root).map_err(|cause| XcframeworkError::Write {
            path: root.clone(),
            cause,
        })?;
    }
    let mut written = Vec::new();
    for slice in SLICES {
        let mut members: Vec<(&str, &[u8])> = Vec::new();
        let mut header: Option<(&str, String)> = None;
        // The headers name their target in the first comment; a universal slice's names all.
        let triples: Vec<&str> = slice.targets.iter().map(|(t, _)| *t).collect();
        let all = triples.join(" and ");
        for (triple, arch) in slice.targets {
            let b = built.iter().find(|b| b.triple == *triple).ok_or_else(|| {
                XcframeworkError::Missing(triple.to_string(), slice.identifier.into())
            })?;
            let h = b.header.replacen(
                &format!("compiled by needlec for {triple}."),
                &format!("compiled by needlec for {all}."),
                1,
            );
            match &header {
                Some((first, first_h)) if *first_h != h => {
                    return Err(XcframeworkError::HeaderMismatch(
                        first.to_string(),
                        triple.to_string(),
                        slice.identifier.into(),
                    ))
                }
                Some(_) => {}
                None => header = Some((triple, h)),
            }
            members.push((arch, &b.archive));
        }
        let dir = root.join(slice.identifier);
        let library = if members.len() == 1 {
            members[0].1.to_vec()
        } else {
            fat_file(&members)
        };
        write(dir.join(format!("lib{name}.a")), &library, &mut written)?;
        let (_, header) = header.expect("every slice has a target");
        let header = header.as_str();
        write(
            dir.join("Headers").join(format!("{name}.h")),
            header.as_bytes(),
            &mut written,
        )?;
        write(
            dir.join("Headers/module.modulemap"),
            module_map(name).as_bytes(),
            &mut written,
        )?;
    }
    write(
        root.join("Info.plist"),
        info_plist(name).as_bytes(),
        &mut written,
    )?;
    write(
        out_dir.join("Package.swift"),
        package_swift(name).as_bytes(),
        &mut written,
    )?;
    Ok(written)
}
