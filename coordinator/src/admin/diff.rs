//! A line diff of two config versions, for the audit log: which files were
//! added, removed or changed, and for changed files the lines removed and
//! added (longest-common-subsequence, capped so a huge change stays a
//! bounded entry).

use std::collections::BTreeMap;

use fleetplane_proto::internal::ConfigFile;

/// Lines of diff kept per file; the rest is counted.
const MAX_LINES_PER_FILE: usize = 40;

/// Files larger than this (in lines, either side) are summarised, not diffed.
const MAX_DIFF_LINES: usize = 2_000;

/// `- old` / `+ new` lines per changed file, under `--- name` headers.
pub fn files(old: &BTreeMap<String, ConfigFile>, new: &BTreeMap<String, ConfigFile>) -> String {
    let mut out = String::new();
    for (name, file) in new {
        match old.get(name) {
            None => out.push_str(&format!("+++ {name} (new file, {} lines)\n", lines(&file.body).len())),
            Some(before) if before.body != file.body => {
                out.push_str(&format!("--- {name}\n"));
                out.push_str(&lines_diff(&lines(&before.body), &lines(&file.body)));
            }
            Some(_) => {}
        }
    }
    for name in old.keys().filter(|name| !new.contains_key(*name)) {
        out.push_str(&format!("--- {name} (removed)\n"));
    }
    out
}

fn lines(body: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(body).lines().map(str::to_owned).collect()
}

fn lines_diff(old: &[String], new: &[String]) -> String {
    if old.len() > MAX_DIFF_LINES || new.len() > MAX_DIFF_LINES {
        return format!("  ({} lines -> {} lines; too large to diff)\n", old.len(), new.len());
    }
    // Longest common subsequence table, then a walk emitting the edits.
    let (n, m) = (old.len(), new.len());
    let mut lcs = vec![vec![0u32; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if old[i] == new[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut edits = Vec::new();
    while i < n || j < m {
        if i < n && j < m && old[i] == new[j] {
            i += 1;
            j += 1;
        } else if i < n && (j == m || lcs[i + 1][j] >= lcs[i][j + 1]) {
            edits.push(format!("- {}", old[i]));
            i += 1;
        } else {
            edits.push(format!("+ {}", new[j]));
            j += 1;
        }
    }
    let mut out = String::new();
    for edit in edits.iter().take(MAX_LINES_PER_FILE) {
        out.push_str(edit);
        out.push('\n');
    }
    if edits.len() > MAX_LINES_PER_FILE {
        out.push_str(&format!(
            "  ({} more changed lines)\n",
            edits.len() - MAX_LINES_PER_FILE
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(files: &[(&str, &str)]) -> BTreeMap<String, ConfigFile> {
        files
            .iter()
            .map(|(name, body)| {
                (
                    (*name).to_owned(),
                    ConfigFile {
                        body: body.as_bytes().to_vec(),
                        content_type: "text/yaml".into(),
                    },
                )
            })
            .collect()
    }

    #[test]
    fn changed_added_and_removed_files_are_listed() {
        let old = config(&[("a.yaml", "x: 1\ny: 2\nz: 3\n"), ("gone.yaml", "g: 1\n")]);
        let new = config(&[("a.yaml", "x: 1\ny: 20\nz: 3\n"), ("b.yaml", "b: 1\nc: 2\n")]);
        let diff = files(&old, &new);
        assert_eq!(
            diff,
            "--- a.yaml\n- y: 2\n+ y: 20\n+++ b.yaml (new file, 2 lines)\n--- gone.yaml (removed)\n"
        );
        assert_eq!(files(&old, &old), "");
    }
}
