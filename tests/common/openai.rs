//! `region-sim --openai` processes and the region files of
//! OpenAI-compatible regions pointing at them (tests/e2e_openai_regions.rs,
//! tests/sim_openai_regions.rs).

use std::path::Path;

use super::{ConfigDir, Proc, region_sim};

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

/// A quick `region-sim --openai` (OpenAI dialect, `gpt-4o-2024-08-06`, no
/// latency, room to spare) whose key `key` is in `cfg`'s `east.key`; the
/// key file's path with it. `east_region` writes its region file.
pub fn quick_east(cfg: &ConfigDir, key: &str) -> (Proc, std::path::PathBuf) {
    let key_file = cfg.path().join("east.key");
    std::fs::write(&key_file, format!("{key}\n")).unwrap();
    let sim = openai_sim(
        cfg.path(),
        "east",
        "openai",
        &key_file,
        "gpt-4o-2024-08-06:1000000:6000",
        &["--base-latency-ms", "0", "--ms-per-1k-tokens", "0"],
    );
    (sim, key_file)
}

/// Region `east` at `endpoint`, serving `gpt-4o` as `quick_east`'s model.
pub fn east_region(cfg: &ConfigDir, endpoint: &str, key_file: &Path) {
    let region = region_head("east", endpoint, "openai", key_file)
        + "[[models]]\nname = \"gpt-4o\"\nprovider_model = \"gpt-4o-2024-08-06\"\ntokens_per_minute = 1000000\nrequests_per_minute = 6000\n";
    cfg.write_region("east", &region);
}
