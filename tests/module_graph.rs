//! No import circles inside a folder of `src/`: within each folder, the
//! files (and subfolders) that name each other through `super::x` or
//! `crate::folder::x` form a graph with no cycle, so every folder reads
//! top-down (docs/ARCHITECTURE.md, "Module graph"). Test modules
//! (`#[cfg(test)]` and `*_tests.rs`) are left out: a test may look anywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// Circles known and not yet broken; each entry is one circle's files,
/// sorted. An entry that no longer is a circle is simply not needed.
const KNOWN: &[&[&str]] = &[];

/// The modules of one folder: its `.rs` files but `mod.rs`, and its
/// subfolders, each with the source it stands for.
fn modules(dir: &Path) -> BTreeMap<String, Vec<PathBuf>> {
    let mut out = BTreeMap::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            out.insert(name, rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") && name != "mod" && !name.ends_with("_tests") {
            out.insert(name, vec![path]);
        }
    }
    out
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files
}

/// The source without its test module (by convention the file's tail).
fn non_test(text: &str) -> &str {
    text.split("#[cfg(test)]").next().unwrap()
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The names `text` reaches through `prefix`: `prefix name` and each
/// name of a `prefix{a, b::c}` group.
fn names_after(text: &str, prefix: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (at, _) in text.match_indices(prefix) {
        if text[..at].ends_with(is_ident) {
            continue;
        }
        let rest = &text[at + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let group = &group[..group.find('}').unwrap_or(group.len())];
            for item in group.split(',') {
                let name: String = item.trim().chars().take_while(|&c| is_ident(c)).collect();
                names.insert(name);
            }
        } else {
            names.insert(rest.chars().take_while(|&c| is_ident(c)).collect());
        }
    }
    names
}

/// Who names whom inside `dir` (`crate_path`: the folder as `crate::a::b::`).
fn graph(dir: &Path, crate_path: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mods = modules(dir);
    let mut graph = BTreeMap::new();
    for (name, files) in &mods {
        let mut deps = BTreeSet::new();
        for file in files {
            let text = fs::read_to_string(file).unwrap();
            let text = non_test(&text);
            // A file in a subfolder reaches its siblings' parent through
            // `super::super::`; only the folder's own files use `super::`.
            let own = file.parent() == Some(dir);
            let mut named = names_after(text, crate_path);
            if own {
                named.extend(names_after(text, "super::"));
            }
            deps.extend(named.into_iter().filter(|n| n != name && mods.contains_key(n)));
        }
        graph.insert(name.clone(), deps);
    }
    graph
}

/// The circles in `graph` (strongly connected parts of two or more).
fn circles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    let reach = |from: &String| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.clone()];
        while let Some(n) = todo.pop() {
            for d in &graph[&n] {
                if seen.insert(d.clone()) {
                    todo.push(d.clone());
                }
            }
        }
        seen
    };
    let reached: BTreeMap<_, _> = graph.keys().map(|n| (n.clone(), reach(n))).collect();
    let mut out: Vec<Vec<String>> = Vec::new();
    for n in graph.keys() {
        let mut part: Vec<String> = graph
            .keys()
            .filter(|m| m == &n || (reached[n].contains(*m) && reached[*m].contains(n)))
            .cloned()
            .collect();
        part.sort();
        if part.len() > 1 && !out.contains(&part) {
            out.push(part);
        }
    }
    out
}

fn folders(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.push(path.clone());
            folders(&path, out);
        }
    }
}

#[test]
fn no_folder_of_src_has_an_import_circle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut dirs = Vec::new();
    folders(&src, &mut dirs);
    assert!(dirs.iter().any(|d| d.ends_with("dispatch")), "found the folders");
    let mut found = Vec::new();
    for dir in dirs {
        let rel = dir
            .strip_prefix(&src)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        let crate_path = format!("crate::{}::", rel.replace('/', "::"));
        for circle in circles(&graph(&dir, &crate_path)) {
            let files: Vec<String> = circle.iter().map(|m| format!("{rel}/{m}")).collect();
            if !KNOWN.iter().any(|k| k.iter().eq(files.iter())) {
                found.push(files.join(" ↔ "));
            }
        }
    }
    assert!(found.is_empty(), "import circles inside a folder: {found:#?}");
}

/// The scan itself finds a circle when there is one.
#[test]
fn a_circle_is_found() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("a.rs"), "use super::b::B;\n").unwrap();
    fs::write(dir.path().join("b.rs"), "use super::{c::C, x};\n").unwrap();
    fs::write(dir.path().join("c.rs"), "fn f() { crate::d::a::g() }\n").unwrap();
    fs::write(
        dir.path().join("e.rs"),
        "use super::a;\n#[cfg(test)]\nuse super::e2;\n",
    )
    .unwrap();
    let g = graph(dir.path(), "crate::d::");
    assert_eq!(circles(&g), vec![vec!["a".to_string(), "b".into(), "c".into()]]);
}
