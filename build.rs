//! Embeds the SQL migrations: writes `$OUT_DIR/migrations.rs` with one list per backend, from
//! `migrations/<backend>/<version>_<name>/up.sql`, and reruns when anything there changes.

use std::fmt::Write as _;
use std::path::Path;
use std::{env, fs, io};

const BACKENDS: [&str; 3] = ["postgres", "mysql", "sqlite"];

fn main() -> io::Result<()> {
    println!("cargo:rerun-if-changed=migrations");
    let root =
        Path::new(&env::var("CARGO_MANIFEST_DIR").map_err(io::Error::other)?).join("migrations");
    let mut out = String::new();
    for backend in BACKENDS {
        let dir = root.join(backend);
        let mut entries: Vec<_> = fs::read_dir(&dir)?
            .collect::<io::Result<Vec<_>>>()?
            .into_iter()
            .filter(|e| e.path().is_dir())
            .collect();
        entries.sort_by_key(|e| e.file_name());
        writeln!(out, "#[cfg(feature = \"{backend}\")]").map_err(io::Error::other)?;
        writeln!(
            out,
            "pub(crate) const {}: &[Migration] = &[",
            backend.to_uppercase()
        )
        .map_err(io::Error::other)?;
        for entry in entries {
            let dir_name = entry
                .file_name()
                .into_string()
                .map_err(|n| io::Error::other(format!("migration directory {n:?} is not UTF-8")))?;
            let (stamp, name) = dir_name.split_once('_').ok_or_else(|| {
                io::Error::other(format!(
                    "migration directory `{dir_name}` is not `<version>_<name>`"
                ))
            })?;
            let version: String = stamp.chars().filter(char::is_ascii_digit).collect();
            let up = entry.path().join("up.sql");
            if !up.is_file() {
                return Err(io::Error::other(format!("{} is missing", up.display())));
            }
            writeln!(
                out,
                "    Migration {{ version: {version:?}, name: {name:?}, up: include_str!({:?}) }},",
                up.display().to_string()
            )
            .map_err(io::Error::other)?;
        }
        writeln!(out, "];").map_err(io::Error::other)?;
    }
    let out_dir = env::var("OUT_DIR").map_err(io::Error::other)?;
    fs::write(Path::new(&out_dir).join("migrations.rs"), out)
}
