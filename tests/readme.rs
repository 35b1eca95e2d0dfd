//! The README's settings table and the code cannot drift: every setting the code knows is
//! documented with its default, and the code reads no `HEALER_` setting it does not document.

use std::collections::BTreeMap;
use std::path::Path;
use vmss_healer::settings::CATALOG;

fn readme_settings() -> BTreeMap<String, String> {
    let rows = readme_rows();
    let table: BTreeMap<String, String> = rows.iter().cloned().collect();
    assert_eq!(
        table.len(),
        rows.len(),
        "a setting is listed twice: {rows:?}"
    );
    table
}

fn readme_rows() -> Vec<(String, String)> {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let start = readme
        .find("<!-- settings:begin -->")
        .expect("settings:begin marker");
    let end = readme
        .find("<!-- settings:end -->")
        .expect("settings:end marker");
    readme[start..end]
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            (cells[1].trim_matches('`').to_string(), cells[2].to_string())
        })
        .collect()
}

#[test]
fn readme_settings_table_matches_the_code() {
    let documented = readme_settings();
    let known: BTreeMap<String, String> = CATALOG
        .iter()
        .map(|s| (s.name.to_string(), s.default.to_string()))
        .collect();
    assert_eq!(
        documented, known,
        "README settings table (left) vs settings::CATALOG (right)"
    );
}

#[test]
fn the_code_reads_only_documented_settings() {
    let mut stack = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("src")];
    let mut found = Vec::new();
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                if !path.ends_with("bin") {
                    stack.push(path);
                }
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                for (i, _) in text.match_indices("\"HEALER_") {
                    let name: String = text[i + 1..]
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    found.push((path.display().to_string(), name));
                }
            }
        }
    }
    assert!(!found.is_empty(), "the scan found the settings module");
    for (file, name) in found {
        let base = name.split("__").next().unwrap();
        // `HEALER_` alone is the prefix used for per-set override keys.
        if base == "HEALER_" {
            continue;
        }
        assert!(
            CATALOG.iter().any(|s| s.name == base),
            "{file} reads {name}, which the README does not document"
        );
    }
}
