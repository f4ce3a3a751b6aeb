//! `region-sim --openai` processes and the region files of
//! OpenAI-compatible regions pointing at them (tests/e2e_openai_regions.rs,
//! tests/sim_openai_regions.rs).

use std::path::Path;

use super::{Proc, region_sim};

/// A `region-sim --openai` in `dialect` serving `model` (NAME:TPM:RPM[:accounting]),
/// callers needing the key in `key_file`.
pub fn openai_sim(
    dir: &Path,
    name: &str,
    dialect: &str,
    key_file: &Path,
    model: &str,
    extra: &[&str],
) -> Proc {
    let mut args = vec![
        "--openai",
        "--dialect",
        dialect,
        "--api-key-file",
        key_file.to_str().unwrap(),
        "--model",
        model,
    ];
    args.extend_from_slice(extra);
    region_sim(dir, name, &args)
}

/// The head of an OpenAI-compatible region's file (its `[[models]]` and
/// other tables follow).
pub fn region_head(name: &str, endpoint: &str, dialect: &str, key_file: &Path) -> String {
    format!(
        "name = \"{name}\"\nkind = \"openai\"\nendpoint = \"{endpoint}\"\ndialect = \"{dialect}\"\napi_key_file = \"{}\"\n",
        key_file.display()
    )
}
