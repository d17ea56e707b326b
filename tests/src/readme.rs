//! Runs the README's command blocks as written, so the documentation cannot
//! rot. A section between `<!-- readme-test:NAME:start -->` and
//! `<!-- readme-test:NAME:end -->` is a walkthrough: each ```sh block in it
//! runs in bash, in order, sharing exported variables through a state file.
//! A block whose first line is `# expect-failure: TEXT` must fail and print
//! TEXT.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{bail, Context as _};

#[derive(Debug, Clone)]
pub struct Block {
    pub code: String,
    pub expect_failure: Option<String>,
}

/// The repository's README.
pub fn readme_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")
}

/// The ```sh blocks of walkthrough `name`.
pub fn blocks(readme: &str, name: &str) -> anyhow::Result<Vec<Block>> {
    let start = format!("<!-- readme-test:{name}:start -->");
    let end = format!("<!-- readme-test:{name}:end -->");
    let from = readme.find(&start).with_context(|| format!("README has no {start}"))? + start.len();
    let to = from + readme[from..].find(&end).with_context(|| format!("README has no {end}"))?;
    let mut blocks = Vec::new();
    let mut rest = &readme[from..to];
    while let Some(i) = rest.find("```sh\n") {
        let body = &rest[i + 6..];
        let close = body.find("\n```").context("unclosed ```sh block")?;
        let code = body[..=close].to_owned();
        let expect_failure =
            code.lines().next().and_then(|l| l.strip_prefix("# expect-failure:")).map(|s| s.trim().to_owned());
        blocks.push(Block { code, expect_failure });
        rest = &body[close + 4..];
    }
    if blocks.is_empty() {
        bail!("walkthrough {name} has no ```sh blocks");
    }
    Ok(blocks)
}

/// Runs blocks in order with `env`, each in `bash -eu -o pipefail`, carrying
/// exported variables from one block to the next. Returns each block's output.
pub async fn run_blocks(blocks: &[Block], env: &BTreeMap<String, String>) -> anyhow::Result<Vec<String>> {
    let state = tempfile_path("kt-readme-state");
    std::fs::write(&state, "")?;
    let mut outputs = Vec::new();
    for (i, block) in blocks.iter().enumerate() {
        let script = format!(
            "set -eu -o pipefail\nset -a; . '{state}'; set +a\n{code}\nexport -p > '{state}'\n",
            state = state.display(),
            code = block.code
        );
        let out = tokio::process::Command::new("bash")
            .arg("-c")
            .arg(&script)
            .envs(env)
            .stdin(Stdio::null())
            .output()
            .await
            .context("failed to run bash")?;
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        match (&block.expect_failure, out.status.success()) {
            (None, true) => {}
            (None, false) => bail!("README block {i} failed:\n{}\n--- output ---\n{text}", block.code),
            (Some(_), true) => bail!("README block {i} should have failed:\n{}\n--- output ---\n{text}", block.code),
            (Some(expected), false) => {
                if !text.contains(expected.as_str()) {
                    bail!("README block {i} failed without `{expected}`:\n--- output ---\n{text}");
                }
                // A failing block does not reach its `export -p`; keep the
                // state of the previous one.
            }
        }
        outputs.push(text);
    }
    let _ = std::fs::remove_file(&state);
    Ok(outputs)
}

fn tempfile_path(prefix: &str) -> PathBuf {
    std::env::temp_dir().join(format!("{prefix}-{}", uuid::Uuid::new_v4().simple()))
}

/// The grpcurl binary: `GRPCURL`, else `grpcurl` on PATH.
pub fn grpcurl() -> anyhow::Result<String> {
    if let Ok(path) = std::env::var("GRPCURL") {
        return Ok(path);
    }
    let found = std::process::Command::new("bash")
        .args(["-c", "command -v grpcurl"])
        .output()
        .context("failed to look for grpcurl")?;
    if found.status.success() {
        return Ok(String::from_utf8_lossy(&found.stdout).trim().to_owned());
    }
    bail!("grpcurl not found: run scripts/test.sh (it installs it) or set GRPCURL")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_blocks_are_extracted_with_expectations() {
        let text = "x\n<!-- readme-test:demo:start -->\n```sh\necho a\n```\ntext\n```sh\n# expect-failure: boom\nfalse\n```\n<!-- readme-test:demo:end -->\n```sh\nnot me\n```";
        let b = blocks(text, "demo").unwrap();
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].code, "echo a\n");
        assert_eq!(b[1].expect_failure.as_deref(), Some("boom"));
        assert!(blocks(text, "other").is_err());
    }
}
