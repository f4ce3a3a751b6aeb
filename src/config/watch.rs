//! Noticing edits to the region files: a fingerprint of every `*.toml` in the
//! directory (name and content), compared between polls. Polling copes with
//! every editor's way of saving (in place, rename, delete and recreate) and
//! with every file system.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

/// Name and content hash of each region file, in name order.
pub type Fingerprint = Vec<(PathBuf, u64)>;

pub fn fingerprint(dir: &Path) -> std::io::Result<Fingerprint> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|x| x == "toml") && path.is_file() {
            let mut h = DefaultHasher::new();
            // A file removed between listing and reading counts as changed.
            std::fs::read(&path).unwrap_or_default().hash(&mut h);
            out.push((path, h.finish()));
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_with_content_names_and_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.toml"), "x = 1").unwrap();
        std::fs::write(dir.path().join("notes.md"), "ignored").unwrap();
        let first = fingerprint(dir.path()).unwrap();
        assert_eq!(first.len(), 1);
        assert_eq!(first, fingerprint(dir.path()).unwrap());
        std::fs::write(dir.path().join("notes.md"), "still ignored").unwrap();
        assert_eq!(first, fingerprint(dir.path()).unwrap());
        std::fs::write(dir.path().join("a.toml"), "x = 2").unwrap();
        let second = fingerprint(dir.path()).unwrap();
        assert_ne!(first, second);
        std::fs::write(dir.path().join("b.toml"), "").unwrap();
        assert_eq!(fingerprint(dir.path()).unwrap().len(), 2);
    }
}
