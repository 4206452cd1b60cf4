//! The control file: one command line per write to `.tarn/ctl`, run
//! against the branch the control directory belongs to.

use std::collections::BTreeMap;

use crate::repo::{CommitOptions, Lake, MergeOptions, MergeOutcome, RepoError};

/// A parsed control command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Commit {
        message: String,
        meta: BTreeMap<String, String>,
    },
    Merge {
        source: String,
        strategy: Option<String>,
        message: Option<String>,
    },
    Revert {
        commit: String,
        parent: Option<usize>,
    },
    Reset {
        path: Option<String>,
    },
    Branch {
        name: String,
    },
    Tag {
        name: String,
    },
    /// Wait until every closed file is in the lake (write-back mode).
    Sync,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("bad command: {0}")]
    Parse(String),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error("{0}")]
    Pending(String),
}

impl ControlError {
    pub fn errno(&self) -> i32 {
        match self {
            ControlError::Parse(_) => libc::EINVAL,
            ControlError::Pending(_) => libc::EAGAIN,
            ControlError::Repo(e) => match e {
                RepoError::NothingToCommit { .. } => libc::ENODATA,
                RepoError::Conflict { .. } => libc::EBUSY,
                RepoError::Concurrent(_) => libc::EAGAIN,
                RepoError::Protected { .. } | RepoError::ReadOnlyRepo(_) => libc::EROFS,
                RepoError::CheckFailed(_) => libc::EPERM,
                RepoError::BranchExists { .. } | RepoError::TagExists { .. } => libc::EEXIST,
                RepoError::UnknownRef { .. }
                | RepoError::AmbiguousRef { .. }
                | RepoError::NoParent { .. } => libc::ENOENT,
                RepoError::BadName { .. }
                | RepoError::BadRefExpr(_)
                | RepoError::BadStrategy(_)
                | RepoError::NeedParent(_)
                | RepoError::Unrevertable(_) => libc::EINVAL,
                _ => libc::EIO,
            },
        }
    }
}

/// Split a command line like a shell would: whitespace-separated words,
/// '...' and "..." quoting, backslash escapes.
pub fn split_words(line: &str) -> Result<Vec<String>, ControlError> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => cur.push(c),
                        None => return Err(ControlError::Parse("unterminated ' quote".into())),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c) => cur.push(c),
                            None => return Err(ControlError::Parse("trailing backslash".into())),
                        },
                        Some(c) => cur.push(c),
                        None => return Err(ControlError::Parse("unterminated \" quote".into())),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some(c) => cur.push(c),
                    None => return Err(ControlError::Parse("trailing backslash".into())),
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    Ok(words)
}

pub fn parse(line: &str) -> Result<Command, ControlError> {
    let words = split_words(line)?;
    let bad = |m: &str| ControlError::Parse(format!("{m} (in {:?})", line.trim()));
    let (verb, rest) = words.split_first().ok_or_else(|| bad("empty command"))?;
    // Flags with one value each; everything else positional.
    let mut flags: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let mut args = Vec::new();
    let mut it = rest.iter();
    while let Some(w) = it.next() {
        if let Some(flag) = [
            "-m",
            "--message",
            "--meta",
            "--strategy",
            "--path",
            "--mainline",
        ]
        .iter()
        .find(|f| **f == w.as_str())
        {
            let v = it
                .next()
                .ok_or_else(|| bad(&format!("{flag} needs a value")))?;
            flags.entry(flag).or_default().push(v.clone());
        } else if w.starts_with('-') {
            return Err(bad(&format!("unknown option {w}")));
        } else {
            args.push(w.clone());
        }
    }
    let one = |flags: &BTreeMap<&str, Vec<String>>, a: &str, b: &str| -> Option<String> {
        flags
            .get(a)
            .or_else(|| flags.get(b))
            .and_then(|v| v.last().cloned())
    };
    let message = one(&flags, "-m", "--message");
    let no_args = |args: &[String]| {
        if args.is_empty() {
            Ok(())
        } else {
            Err(bad(&format!("unexpected argument {}", args[0])))
        }
    };
    match verb.as_str() {
        "commit" => {
            no_args(&args)?;
            let mut meta = BTreeMap::new();
            for kv in flags.get("--meta").cloned().unwrap_or_default() {
                let (k, v) = kv
                    .split_once('=')
                    .ok_or_else(|| bad("--meta needs KEY=VALUE"))?;
                meta.insert(k.to_string(), v.to_string());
            }
            Ok(Command::Commit {
                message: message.ok_or_else(|| bad("commit needs -m MESSAGE"))?,
                meta,
            })
        }
        "merge" => match args.as_slice() {
            [source] => Ok(Command::Merge {
                source: source.clone(),
                strategy: one(&flags, "--strategy", "--strategy"),
                message,
            }),
            _ => Err(bad("merge needs one REF")),
        },
        "revert" => match args.as_slice() {
            [commit] => {
                let parent = match one(&flags, "--mainline", "-m") {
                    Some(p) => Some(p.parse().map_err(|_| bad("-m needs a parent number"))?),
                    None => None,
                };
                Ok(Command::Revert {
                    commit: commit.clone(),
                    parent,
                })
            }
            _ => Err(bad("revert needs one COMMIT")),
        },
        "reset" => {
            no_args(&args)?;
            Ok(Command::Reset {
                path: one(&flags, "--path", "--path"),
            })
        }
        "branch" => match args.as_slice() {
            [name] => Ok(Command::Branch { name: name.clone() }),
            _ => Err(bad("branch needs one NAME")),
        },
        "sync" => {
            no_args(&args)?;
            Ok(Command::Sync)
        }
        "tag" => match args.as_slice() {
            [name] => Ok(Command::Tag { name: name.clone() }),
            _ => Err(bad("tag needs one NAME")),
        },
        other => Err(bad(&format!(
            "unknown command {other:?}: use commit, merge, revert, reset, branch, tag or sync"
        ))),
    }
}

/// Run a command against `repo/branch`; the result as a JSON value.
pub fn run(
    lake: &Lake,
    repo: &str,
    branch: &str,
    cmd: &Command,
) -> Result<serde_json::Value, ControlError> {
    use serde_json::json;
    Ok(match cmd {
        Command::Commit { message, meta } => {
            let id = lake.commit_branch(
                repo,
                branch,
                &CommitOptions {
                    message: message.clone(),
                    author: None,
                    meta: meta.clone(),
                    allow_empty: false,
                },
            )?;
            json!({"command": "commit", "commit": id.to_hex()})
        }
        Command::Merge {
            source,
            strategy,
            message,
        } => {
            let opts = MergeOptions {
                message: message.clone(),
                strategy: strategy.as_deref().map(str::parse).transpose()?,
                ..Default::default()
            };
            match lake.merge(repo, source, branch, &opts)? {
                MergeOutcome::UpToDate => json!({"command": "merge", "outcome": "up-to-date"}),
                MergeOutcome::FastForward(h) => {
                    json!({"command": "merge", "outcome": "fast-forward", "commit": h.to_hex()})
                }
                MergeOutcome::Merged(h) => {
                    json!({"command": "merge", "outcome": "merged", "commit": h.to_hex()})
                }
            }
        }
        Command::Revert { commit, parent } => {
            let c = lake.resolve(repo, commit)?.commit;
            let id = lake.revert(repo, branch, &c, *parent, None)?;
            json!({"command": "revert", "commit": id.to_hex()})
        }
        Command::Reset { path } => {
            match path {
                Some(p) => {
                    let p = crate::tree::check_path(p)
                        .map_err(|e| ControlError::Parse(e.to_string()))?;
                    lake.reset_path(repo, branch, &p)?
                }
                None => lake.reset(repo, branch)?,
            }
            json!({"command": "reset"})
        }
        Command::Branch { name } => {
            let at = lake.create_branch(repo, name, branch)?;
            json!({"command": "branch", "branch": name, "commit": at.to_hex()})
        }
        Command::Tag { name } => {
            let at = lake.create_tag(repo, name, branch)?;
            json!({"command": "tag", "tag": name, "commit": at.to_hex()})
        }
        // The mount waited for uploads before running it.
        Command::Sync => json!({"command": "sync"}),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commands() {
        assert_eq!(
            parse("commit -m \"nightly ingest\" --meta src=crm\n").unwrap(),
            Command::Commit {
                message: "nightly ingest".into(),
                meta: BTreeMap::from([("src".to_string(), "crm".to_string())]),
            }
        );
        assert_eq!(
            parse("merge dev --strategy source-wins").unwrap(),
            Command::Merge {
                source: "dev".into(),
                strategy: Some("source-wins".into()),
                message: None
            }
        );
        assert_eq!(parse("reset").unwrap(), Command::Reset { path: None });
        assert_eq!(parse("sync\n").unwrap(), Command::Sync);
        assert_eq!(
            parse("branch experiment-1").unwrap(),
            Command::Branch {
                name: "experiment-1".into()
            }
        );
        assert_eq!(
            split_words(r#"a 'b c' "d \" e" f\ g"#).unwrap(),
            ["a", "b c", "d \" e", "f g"]
        );
        for bad in [
            "",
            "frobnicate now",
            "commit",
            "commit -m",
            "merge",
            "merge a b",
            "commit -m 'x",
            "reset --bogus",
            "sync now",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
