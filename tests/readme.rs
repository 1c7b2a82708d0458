//! The README's command block, run as written: every `lvpipe` line of the
//! block under "## Commands", in order, in a temporary folder holding a copy
//! of `recipes/`, must succeed.

mod common;

use std::path::Path;

/// The lines of the first `sh` block after `heading`, continuation lines
/// joined and trailing comments dropped.
fn block_after(readme: &str, heading: &str) -> Vec<String> {
    let start = readme.find(heading).expect("the README has the heading");
    let body = &readme[start..];
    let open = body.find("```sh\n").expect("a sh block") + "```sh\n".len();
    let close = body[open..].find("```").expect("the block ends") + open;
    let mut lines = Vec::new();
    let mut pending = String::new();
    for line in body[open..close].lines() {
        let line = strip_comment(line);
        match line.trim_end().strip_suffix('\\') {
            Some(head) => pending.push_str(head),
            None => {
                pending.push_str(line);
                if !pending.trim().is_empty() {
                    lines.push(std::mem::take(&mut pending));
                }
                pending.clear();
            }
        }
    }
    lines
}

/// The line up to a `#` outside double quotes.
fn strip_comment(line: &str) -> &str {
    let mut quoted = false;
    for (i, c) in line.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '#' if !quoted => return &line[..i],
            _ => {}
        }
    }
    line
}

/// Words as a shell splits them: white space outside double quotes.
fn words(line: &str) -> Vec<String> {
    let (mut out, mut word, mut quoted, mut any) = (Vec::new(), String::new(), false, false);
    for c in line.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    out.push(std::mem::take(&mut word));
                    any = false;
                }
            }
            c => {
                word.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(word);
    }
    out
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[test]
fn the_readme_command_block_runs_as_written() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let lines = block_after(&readme, "## Commands");
    assert!(lines.len() >= 15, "{lines:?}");
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&root.join("recipes"), &dir.path().join("recipes"));
    for line in &lines {
        let words = words(line);
        let out = match words[0].as_str() {
            "lvpipe" => {
                let args: Vec<&str> = words[1..].iter().map(String::as_str).collect();
                common::lvpipe(dir.path(), &args)
            }
            // A data-parallel line: the launcher's arguments, then lvpipe's
            // (a build with MPI; the README's test command has it).
            "mpirun" if cfg!(feature = "mpi") => {
                let at = words
                    .iter()
                    .position(|w| w == "lvpipe")
                    .expect("lvpipe in the line");
                common::mpirun()
                    .args(&words[1..at])
                    .arg(env!("CARGO_BIN_EXE_lvpipe"))
                    .args(&words[at + 1..])
                    .current_dir(dir.path())
                    .output()
                    .expect("mpirun runs (openmpi-bin)")
            }
            "mpirun" => continue,
            _ => panic!("not an lvpipe command: {line}"),
        };
        assert!(
            out.status.success(),
            "README line failed ({:?}): {line}\n{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(dir.path().join("report/eval.json").exists());
}

#[test]
fn lines_split_as_a_shell_splits_them() {
    assert_eq!(
        words(r#"lvpipe sql --shards s/ "SELECT a, b FROM t" --format json"#),
        [
            "lvpipe",
            "sql",
            "--shards",
            "s/",
            "SELECT a, b FROM t",
            "--format",
            "json"
        ]
    );
    assert_eq!(strip_comment("lvpipe x   # a note"), "lvpipe x   ");
    assert_eq!(
        strip_comment(r##"lvpipe sql "a # b""##),
        r##"lvpipe sql "a # b""##
    );
    let block = block_after(
        "## Commands\n\n```sh\nlvpipe a \\\n    --b c  # d\nlvpipe e\n```\n",
        "## Commands",
    );
    assert_eq!(block.len(), 2);
    assert_eq!(words(&block[0]), ["lvpipe", "a", "--b", "c"]);
}
