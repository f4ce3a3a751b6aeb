//! Noticing edits to the region files: a fingerprint of every `*.toml` in the
//! directory (name and content), compared between polls. Polling copes with
//! every editor's way of saving (in place, rename, delete and recreate) and
//! with every file system. An entry named `*.toml` that is no readable file
//! (a directory, a symlink loop or to nowhere) is not a region file; it is
//! skipped, and `SkipNotes` has it said once per path until it changes.

use std::collections::HashMap;
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

/// Each `*.toml` entry in `dir` that is not a readable regular file, and
/// why it is skipped, in name order.
pub fn skipped(dir: &Path) -> Vec<(PathBuf, String)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<(PathBuf, String)> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .filter_map(|path| {
            let why = match std::fs::metadata(&path) {
                Ok(m) if m.is_file() => return None,
                Ok(m) if m.is_dir() => "is a directory, not a region file".to_string(),
                Ok(_) => "is not a regular file".to_string(),
                Err(e) => format!("cannot be read ({e})"),
            };
            Some((path, why))
        })
        .collect();
    out.sort();
    out
}

/// What was said about skipped entries, so each is said once: again only
/// when its reason changes, or after it was gone and came back.
#[derive(Debug, Default)]
pub struct SkipNotes {
    said: HashMap<PathBuf, String>,
}

impl SkipNotes {
    /// The entries of `now` not said before in these words; forgets those
    /// no longer skipped.
    pub fn news(&mut self, now: Vec<(PathBuf, String)>) -> Vec<(PathBuf, String)> {
        let mut next = HashMap::with_capacity(now.len());
        let mut news = Vec::new();
        for (path, why) in now {
            if self.said.get(&path) != Some(&why) {
                news.push((path.clone(), why.clone()));
            }
            next.insert(path, why);
        }
        self.said = next;
        news
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_or_a_symlink_loop_is_said_once_until_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let at = |name: &str| dir.path().join(name);
        std::fs::write(at("good.toml"), "x = 1").unwrap();
        std::fs::create_dir(at("folder.toml")).unwrap();
        std::os::unix::fs::symlink(at("loop.toml"), at("loop.toml")).unwrap();
        let mut notes = SkipNotes::default();
        let first = notes.news(skipped(dir.path()));
        let names: Vec<_> = first
            .iter()
            .map(|(p, _)| p.file_name().unwrap().to_owned())
            .collect();
        assert_eq!(names, ["folder.toml", "loop.toml"]);
        assert!(first[0].1.contains("is a directory"), "{first:?}");
        assert!(first[1].1.contains("cannot be read"), "{first:?}");
        assert_eq!(notes.news(skipped(dir.path())), [], "said once");

        // The folder becomes a link to nowhere: said again, in new words.
        std::fs::remove_dir(at("folder.toml")).unwrap();
        std::os::unix::fs::symlink(at("nowhere"), at("folder.toml")).unwrap();
        let changed = notes.news(skipped(dir.path()));
        assert_eq!(changed.len(), 1, "{changed:?}");
        assert!(changed[0].1.contains("No such file"), "{changed:?}");

        // Gone, then back: said again.
        std::fs::remove_file(at("loop.toml")).unwrap();
        assert_eq!(notes.news(skipped(dir.path())), []);
        std::os::unix::fs::symlink(at("loop.toml"), at("loop.toml")).unwrap();
        assert_eq!(notes.news(skipped(dir.path())).len(), 1);
    }

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
