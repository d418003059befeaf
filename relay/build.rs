//! Embeds the web app's built bundle (`web/dist`, committed to the repository) into the relay
//! binary: one table entry per file, with its gzip and brotli siblings when the bundle has them.
//!
//! The bundle is committed so that `cargo build` needs no Node.js; `web/check-bundle` rebuilds it
//! and fails when the committed one is stale. Without a `web/dist` (a trimmed source tree), the
//! table is empty and `/` says that the web app was not built into this relay.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let dist = manifest.join("../web/dist");
    println!("cargo:rerun-if-changed={}", dist.display());
    let mut files = Vec::new();
    if dist.is_dir() {
        collect(&dist, &dist, &mut files);
    }
    files.sort();
    let mut out =
        String::from("/// Every file of the web app's bundle.\npub static ASSETS: &[Asset] = &[\n");
    for rel in files.iter().filter(|f| !is_compressed(f)) {
        let full = dist.join(rel);
        let bytes = std::fs::read(&full).expect("read a web/dist file");
        let sibling = |ext: &str| {
            let name = format!("{rel}.{ext}");
            if files.contains(&name) {
                format!(
                    "Some(include_bytes!({:?}))",
                    dist.join(&name).display().to_string()
                )
            } else {
                "None".to_owned()
            }
        };
        writeln!(
            out,
            "    Asset {{ path: {:?}, raw: include_bytes!({:?}), gzip: {}, brotli: {}, etag: {:?} }},",
            format!("/{rel}"),
            full.display().to_string(),
            sibling("gz"),
            sibling("br"),
            format!("\"{:016x}\"", fnv1a(&bytes)),
        )
        .expect("write to a String");
    }
    out.push_str("];\n");
    let target =
        PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets it")).join("web_assets.rs");
    std::fs::write(target, out).expect("write the asset table");
}

/// The paths of every file under `dir`, relative to `root`, with `/` separators.
fn collect(root: &Path, dir: &Path, files: &mut Vec<String>) {
    let entries = std::fs::read_dir(dir).expect("read web/dist");
    for entry in entries {
        let path = entry.expect("a web/dist entry").path();
        if path.is_dir() {
            collect(root, &path, files);
        } else if let Ok(rel) = path.strip_prefix(root) {
            let parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            files.push(parts.join("/"));
        }
    }
}

fn is_compressed(name: &str) -> bool {
    name.ends_with(".gz") || name.ends_with(".br")
}

/// FNV-1a, 64 bits: an ETag that changes with the content (not a security property).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
