//! The C benchmark manifests (`MANIFEST.toml`: `[[bench]]` tables of name, lang, sources, flags,
//! args), as the guest build (`guest/build.rs`) and `make bench-c` (`vmm/benches/cbench.rs`)
//! both read them: where they are and what they say.

use std::path::{Path, PathBuf};

#[derive(serde::Deserialize)]
struct Manifest {
    #[serde(default)]
    bench: Vec<Bench>,
}

/// One program of a manifest.
#[derive(serde::Deserialize, Clone, Debug)]
pub struct Bench {
    pub name: String,
    /// "c" or "c++".
    pub lang: String,
    /// Relative to `folder`.
    pub sources: Vec<String>,
    #[serde(default)]
    pub flags: Vec<String>,
    /// mimalloc-bench's arguments; `{N}` is the number of threads.
    #[serde(default)]
    pub args: String,
    /// The manifest's folder (compilers run there).
    #[serde(skip)]
    pub folder: PathBuf,
}

/// The third-party manifest folders: `../shared/cbench` next to the repository `root` (if it
/// has a manifest), then every folder in `CBENCH_EXTRA` (colon-separated).
pub fn third_party_folders(root: &Path) -> Vec<PathBuf> {
    let mut folders = Vec::new();
    let shared = root.join("../shared/cbench");
    if shared.join("MANIFEST.toml").exists() {
        folders.push(shared);
    }
    if let Ok(extra) = std::env::var("CBENCH_EXTRA") {
        folders.extend(extra.split(':').filter(|s| !s.is_empty()).map(PathBuf::from));
    }
    folders
}

/// The programs of `folder`'s manifest.
pub fn read(folder: &Path) -> Result<Vec<Bench>, String> {
    let path = folder.join("MANIFEST.toml");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let m: Manifest = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(m.bench
        .into_iter()
        .map(|mut b| {
            b.folder = folder.to_path_buf();
            b
        })
        .collect())
}
