//! Git on a workspace, never as root and never trusting what the agent wrote.
//!
//! The agent controls `.git/config`: `core.fsmonitor`, hooks, filters, a pager, `insteadOf`
//! and includes can run commands or redirect a push. So:
//!
//! - the clone runs as the sandbox uid (through `setpriv`) with an empty environment, no
//!   system or global config, no prompt, no askpass or ssh, and a protocol allow-list; a
//!   repository whose scheme is not allowed is refused before anything runs;
//! - commits and restores run inside a fresh sandbox process (the exec view), with hooks and
//!   fsmonitor off; anything else the config runs runs there, as the uid, with no network;
//! - a push bundles HEAD inside the sandbox, reads the bundle link-proof from the host, and
//!   pushes from a host-owned bare repository that never sees the workspace's config.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::process::{Pid, Signal};

use crate::Error;
use crate::provider::{Commit, CommitRequest, GitCredentials};

/// How workspaces are cloned (and where pushes may go).
#[derive(Debug, Clone)]
pub struct CloneConfig {
    /// URL schemes a repository (or push remote) may use: `https` by default. `file` covers
    /// `file://` and plain paths, `ssh` covers `ssh://` and `user@host:path`.
    pub allowed_schemes: Vec<String>,
    /// The clone is killed after this long.
    pub timeout: Duration,
    /// The clone is killed when the workspace grows past this (polled); also the largest push
    /// bundle read back.
    pub max_bytes: u64,
}

impl Default for CloneConfig {
    fn default() -> Self {
        Self {
            allowed_schemes: vec!["https".to_owned()],
            timeout: Duration::from_secs(120),
            max_bytes: 1 << 30,
        }
    }
}

/// The file a push bundle is written to, at the workspace root.
pub(crate) const PUSH_BUNDLE: &str = ".canopy-push.bundle";
const PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// The scheme git would use for `repository`, lowercased.
pub(crate) fn scheme_of(repository: &str) -> String {
    let scheme_chars = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
    };
    // `<transport>::<address>` runs a remote helper (`ext::` runs a command).
    if let Some((transport, _)) = repository.split_once("::")
        && scheme_chars(transport)
    {
        return transport.to_ascii_lowercase();
    }
    if let Some((scheme, _)) = repository.split_once("://")
        && scheme_chars(scheme)
    {
        let scheme = scheme.to_ascii_lowercase();
        return match scheme.as_str() {
            "git+ssh" | "ssh+git" => "ssh".to_owned(),
            _ => scheme,
        };
    }
    // scp-like `[user@]host:path`: a colon before any slash.
    if let Some(colon) = repository.find(':')
        && colon > 0
        && !repository[..colon].contains('/')
    {
        return "ssh".to_owned();
    }
    "file".to_owned()
}

/// Refuses `repository` unless its scheme is allowed.
pub(crate) fn check_scheme(repository: &str, allowed: &[String]) -> Result<(), Error> {
    let scheme = scheme_of(repository);
    if allowed.iter().any(|a| a.eq_ignore_ascii_case(&scheme)) {
        Ok(())
    } else {
        Err(Error::SchemeNotAllowed {
            repository: repository.to_owned(),
            scheme,
            allowed: allowed.to_vec(),
        })
    }
}

/// `-c` options: every protocol off but the allowed ones.
fn protocol_options(allowed: &[String]) -> Vec<String> {
    let mut options = vec!["-c".to_owned(), "protocol.allow=never".to_owned()];
    for scheme in allowed {
        options.push("-c".to_owned());
        options.push(format!(
            "protocol.{}.allow=always",
            scheme.to_ascii_lowercase()
        ));
    }
    options
}

/// Git with an empty environment: no system or global config, no prompt, no askpass, no ssh,
/// no credential helper. `home` must be a directory nobody else writes (or `/nonexistent`).
fn clean_git(program: &mut Command, home: &Path) {
    program
        .env_clear()
        .env("PATH", PATH)
        .env("HOME", home)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_ASKPASS", "/bin/false")
        .env("SSH_ASKPASS", "/bin/false")
        .env("GIT_SSH_COMMAND", "/bin/false")
        .args(["-c", "credential.helper=", "-c", "core.hooksPath=/dev/null"])
        .stdin(Stdio::null())
        .current_dir("/");
}

/// `git` as `uid` (no groups, no capabilities, no new privileges), or as this process when
/// `None` (rootless: there is no other uid to be); the environment and options are the same.
fn git_as(uid: Option<u32>, allowed: &[String]) -> Command {
    let mut command = match uid {
        Some(uid) => {
            let setpriv = crate::bwrap::as_uid(uid);
            let mut command = Command::new(&setpriv[0]);
            command.args(&setpriv[1..]).arg("git");
            command
        }
        None => Command::new("git"),
    };
    clean_git(&mut command, Path::new("/nonexistent"));
    command.args(protocol_options(allowed));
    command
}

/// Clones `repository` into `staging` (an empty directory owned by `uid`) as `uid` (`None`:
/// as this process, rootless), then creates `branch` there. Killed at the timeout or once the directory passes `max_bytes`
/// (its size is polled every 100 ms).
pub(crate) fn clone_as(
    uid: Option<u32>,
    repository: &str,
    branch: &str,
    staging: &Path,
    config: &CloneConfig,
) -> Result<(), Error> {
    check_scheme(repository, &config.allowed_schemes)?;
    let mut command = git_as(uid, &config.allowed_schemes);
    let local = scheme_of(repository) == "file";
    if local {
        // A local source belongs to another user (root, say); as the uid, git would refuse it
        // as of dubious ownership. Reading it is all the uid does: neither the local copy nor
        // upload-pack runs a hook, and upload-pack ignores `uploadpack.packObjectsHook` from
        // the repository's config.
        command.args(["-c", "safe.directory=*"]);
    }
    command.args(["clone", "--quiet", "--no-hardlinks"]);
    if local {
        // `file://` runs upload-pack, which does not get the `-c` above (git clears config
        // parameters for local transports).
        command.args(["--upload-pack", "git -c 'safe.directory=*' upload-pack"]);
    }
    command
        .args(["--", repository])
        .arg(staging)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        // Its own group, so a kill reaches the transport helpers too.
        .process_group(0);
    let mut child = command.spawn().map_err(|source| Error::Spawn {
        program: "git clone".to_owned(),
        source,
    })?;
    let began = Instant::now();
    let kill = |child: &mut std::process::Child| {
        if let Some(pid) = i32::try_from(child.id()).ok().and_then(Pid::from_raw) {
            let _ = rustix::process::kill_process_group(pid, Signal::KILL);
        }
        let _ = child.wait();
    };
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(error) => {
                kill(&mut child);
                return Err(Error::Command {
                    what: "waiting for git clone".to_owned(),
                    detail: error.to_string(),
                });
            }
        }
        if began.elapsed() > config.timeout {
            kill(&mut child);
            return Err(Error::CloneTimeout {
                repository: repository.to_owned(),
                after: config.timeout,
            });
        }
        if tree_size(staging) > config.max_bytes {
            kill(&mut child);
            return Err(Error::CloneTooLarge {
                repository: repository.to_owned(),
                max_bytes: config.max_bytes,
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // A clone may finish between two polls.
    if tree_size(staging) > config.max_bytes {
        return Err(Error::CloneTooLarge {
            repository: repository.to_owned(),
            max_bytes: config.max_bytes,
        });
    }
    if !status.success() {
        let mut stderr = String::new();
        if let Some(mut pipe) = child.stderr.take() {
            let _ = pipe.read_to_string(&mut stderr);
        }
        return Err(Error::Command {
            what: format!("git clone of {repository:?}"),
            detail: stderr.trim().to_owned(),
        });
    }
    let mut checkout = git_as(uid, &config.allowed_schemes);
    checkout
        .arg("-C")
        .arg(staging)
        .args(["checkout", "--quiet", "-b", branch]);
    run(checkout, "git checkout -b")
}

/// Bytes under `path`, links not followed.
fn tree_size(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if !meta.is_dir() {
        return meta.len();
    }
    let Ok(entries) = std::fs::read_dir(path) else {
        return meta.len();
    };
    meta.len()
        + entries
            .flatten()
            .map(|entry| tree_size(&entry.path()))
            .sum::<u64>()
}

fn run(mut command: Command, what: &str) -> Result<(), Error> {
    output(&mut command, what).map(|_| ())
}

fn output(command: &mut Command, what: &str) -> Result<String, Error> {
    let output = command.output().map_err(|source| Error::Spawn {
        program: what.to_owned(),
        source,
    })?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(Error::Command {
            what: what.to_owned(),
            detail: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// The preamble of every git script run inside a sandbox: the agent's config may stay, but
/// hooks, fsmonitor, signing, pagers and the global and system config do not apply.
const SANDBOX_GIT: &str = "set -e\n\
export GIT_CONFIG_NOSYSTEM=1 GIT_CONFIG_GLOBAL=/dev/null GIT_TERMINAL_PROMPT=0 GIT_PAGER=cat\n\
g() { git -c core.hooksPath=/dev/null -c core.fsmonitor=false -c commit.gpgsign=false \
-c core.pager=cat \"$@\"; }\n";

/// `(script, args)` of a commit: `$1` name, `$2` email, `$3` message. Prints `created=0|1`,
/// HEAD, then the changed paths NUL-separated.
pub(crate) fn commit_script(request: &CommitRequest) -> Result<(String, Vec<String>), Error> {
    for (field, value) in [
        ("author name", &request.author_name),
        ("author email", &request.author_email),
    ] {
        if value.trim().is_empty() || value.len() > 256 {
            return Err(Error::InvalidGitInput {
                field,
                reason: "use 1 to 256 bytes".to_owned(),
            });
        }
        if value
            .chars()
            .any(|c| c.is_control() || c == '<' || c == '>')
        {
            return Err(Error::InvalidGitInput {
                field,
                reason: "no control characters, '<' or '>'".to_owned(),
            });
        }
    }
    if request.message.trim().is_empty()
        || request.message.len() > 64 << 10
        || request.message.contains('\0')
    {
        return Err(Error::InvalidGitInput {
            field: "commit message",
            reason: "use 1 byte to 64 KiB, no NUL".to_owned(),
        });
    }
    let script = format!(
        "{SANDBOX_GIT}\
         export GIT_AUTHOR_NAME=\"$1\" GIT_AUTHOR_EMAIL=\"$2\" GIT_COMMITTER_NAME=\"$1\" GIT_COMMITTER_EMAIL=\"$2\"\n\
         g add --all\n\
         if g diff --cached --quiet; then\n\
           printf 'created=0\\n'; g rev-parse --verify HEAD\n\
         else\n\
           g commit --quiet --no-verify -m \"$3\"\n\
           printf 'created=1\\n'; g rev-parse --verify HEAD\n\
           g diff-tree --no-commit-id --name-only -r -z --root HEAD\n\
         fi\n"
    );
    Ok((
        script,
        vec![
            request.author_name.clone(),
            request.author_email.clone(),
            request.message.clone(),
        ],
    ))
}

/// Reads what [`commit_script`] printed.
pub(crate) fn parse_commit(stdout: &str) -> Result<Commit, Error> {
    let bad = || Error::SandboxGit {
        what: "commit".to_owned(),
        detail: format!("unexpected output {stdout:?}"),
    };
    let (created, rest) = stdout.split_once('\n').ok_or_else(bad)?;
    let created = match created {
        "created=1" => true,
        "created=0" => false,
        _ => return Err(bad()),
    };
    let (sha, files) = rest.split_once('\n').ok_or_else(bad)?;
    validate_sha(sha).map_err(|_| bad())?;
    let files_changed = files
        .split('\0')
        .filter(|path| !path.is_empty())
        .map(str::to_owned)
        .collect();
    Ok(Commit {
        sha: sha.to_owned(),
        files_changed,
        created,
    })
}

/// A full commit id: 40 lowercase hex digits.
pub(crate) fn validate_sha(sha: &str) -> Result<(), Error> {
    if sha.len() == 40
        && sha
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(())
    } else {
        Err(Error::InvalidGitInput {
            field: "commit sha",
            reason: format!("{sha:?} is not 40 lowercase hex digits"),
        })
    }
}

/// `$1` is a validated sha.
pub(crate) fn restore_script() -> String {
    format!(
        "{SANDBOX_GIT}g cat-file -e \"$1^{{commit}}\"\ng reset --quiet --hard \"$1\"\ng clean -fdq\n"
    )
}

/// Bundles HEAD into [`PUSH_BUNDLE`] at the workspace root.
pub(crate) fn bundle_script() -> String {
    format!("{SANDBOX_GIT}rm -f {PUSH_BUNDLE}\ng bundle create --quiet {PUSH_BUNDLE} HEAD\n")
}

/// Copies the bundle out of `workspace` into `into`, link-proof: the workspace is opened with
/// `O_DIRECTORY|O_NOFOLLOW`, the bundle with `O_NOFOLLOW|O_NONBLOCK` relative to it, and must
/// be a regular file owned by `uid` of at most `max_bytes`. The bundle is then deleted.
pub(crate) fn take_bundle(
    workspace: &Path,
    uid: u32,
    max_bytes: u64,
    into: &Path,
) -> Result<(), Error> {
    let path = workspace.join(PUSH_BUNDLE);
    let refuse = |reason: String| Error::UnsafeBundle {
        path: path.clone(),
        reason,
    };
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let dir = rustix::fs::open(workspace, flags | OFlags::DIRECTORY, Mode::empty())
        .map_err(|error| refuse(format!("cannot open the workspace: {error}")))?;
    let result = (|| {
        let fd = rustix::fs::openat(&dir, PUSH_BUNDLE, flags | OFlags::NONBLOCK, Mode::empty())
            .map_err(|error| refuse(format!("cannot open it: {error}")))?;
        let stat = rustix::fs::fstat(&fd).map_err(|error| refuse(format!("fstat: {error}")))?;
        let kind = FileType::from_raw_mode(stat.st_mode);
        if kind != FileType::RegularFile {
            return Err(refuse(format!("it is a {kind:?}, not a regular file")));
        }
        if stat.st_uid != uid {
            return Err(refuse(format!(
                "it is owned by uid {}, not the sandbox uid {uid}",
                stat.st_uid
            )));
        }
        let size = u64::try_from(stat.st_size).unwrap_or(u64::MAX);
        if size > max_bytes {
            return Err(refuse(format!("{size} bytes is over {max_bytes}")));
        }
        let mut target = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(into)
            .map_err(|source| Error::Prepare {
                path: into.to_owned(),
                source,
            })?;
        let copied = std::io::copy(&mut File::from(fd).take(max_bytes + 1), &mut target)
            .map_err(|error| refuse(format!("reading it: {error}")))?;
        if copied > max_bytes {
            return Err(refuse(format!("it grew past {max_bytes} bytes")));
        }
        Ok(())
    })();
    let _ = rustix::fs::unlinkat(&dir, PUSH_BUNDLE, AtFlags::empty());
    result
}

/// Pushes the HEAD of `bundle` to `branch` of `remote_url` from a fresh bare repository in
/// `scratch` (a host-owned directory), as root with a clean environment. Returns the sha.
pub(crate) fn push_bundle(
    scratch: &Path,
    bundle: &Path,
    remote_url: &str,
    branch: &str,
    credentials: Option<&GitCredentials>,
    allowed: &[String],
) -> Result<String, Error> {
    check_scheme(remote_url, allowed)?;
    let repo = scratch.join("repo.git");
    let home = scratch.join("home");
    std::fs::create_dir(&home).map_err(|source| Error::Prepare {
        path: home.clone(),
        source,
    })?;
    let host_git = |allowed: &[String]| {
        let mut command = Command::new("git");
        clean_git(&mut command, &home);
        command
            .args(protocol_options(allowed))
            .args(["-c", "transfer.fsckObjects=true"]);
        command
    };
    let mut init = host_git(&[]);
    init.args(["init", "--quiet", "--bare"]).arg(&repo);
    run(init, "git init")?;
    let mut fetch = host_git(&["file".to_owned()]);
    fetch
        .arg("-C")
        .arg(&repo)
        .args(["fetch", "--quiet", "--no-tags"])
        .arg(bundle)
        .arg("+HEAD:refs/canopy/push");
    run(fetch, "git fetch of the push bundle")?;
    let mut rev_parse = host_git(&[]);
    rev_parse
        .arg("-C")
        .arg(&repo)
        .args(["rev-parse", "--verify", "refs/canopy/push^{commit}"]);
    let sha = output(&mut rev_parse, "git rev-parse")?.trim().to_owned();
    validate_sha(&sha)?;
    let mut push = host_git(allowed);
    push.arg("-C")
        .arg(&repo)
        .args(["push", "--quiet", "--", remote_url])
        .arg(format!("{sha}:refs/heads/{branch}"));
    if let Some(credentials) = credentials {
        // A one-shot askpass that answers from its own environment: nothing in an argument.
        let askpass = scratch.join("askpass");
        std::fs::write(&askpass, ASKPASS).map_err(|source| Error::Prepare {
            path: askpass.clone(),
            source,
        })?;
        std::fs::set_permissions(&askpass, std::fs::Permissions::from_mode(0o700)).map_err(
            |source| Error::Prepare {
                path: askpass.clone(),
                source,
            },
        )?;
        push.env("GIT_ASKPASS", &askpass)
            .env("CANOPY_GIT_USERNAME", &credentials.username)
            .env("CANOPY_GIT_PASSWORD", &credentials.password);
    }
    run(push, "git push")?;
    Ok(sha)
}

/// Git asks `Username for '…': ` then `Password for '…': `.
const ASKPASS: &str = "#!/bin/sh\ncase \"$1\" in\n  Username*) printf '%s\\n' \"$CANOPY_GIT_USERNAME\" ;;\n  *) printf '%s\\n' \"$CANOPY_GIT_PASSWORD\" ;;\nesac\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_are_what_git_would_use() {
        for (repository, scheme) in [
            ("https://example.com/a.git", "https"),
            ("HTTPS://example.com/a.git", "https"),
            ("http://example.com/a.git", "http"),
            ("file:///srv/a.git", "file"),
            ("/srv/a.git", "file"),
            ("./a:b", "file"),
            ("a.git", "file"),
            ("git@github.com:o/r.git", "ssh"),
            ("github.com:o/r.git", "ssh"),
            ("ssh://git@github.com/o/r.git", "ssh"),
            ("git+ssh://github.com/o/r.git", "ssh"),
            ("git://example.com/a.git", "git"),
            ("ext::sh -c touch% /tmp/pwned", "ext"),
            ("fd::17", "fd"),
        ] {
            assert_eq!(scheme_of(repository), scheme, "{repository}");
        }
        let https = vec!["https".to_owned()];
        assert!(check_scheme("https://example.com/a.git", &https).is_ok());
        for refused in ["/srv/a.git", "file:///srv/a.git", "git@h:r", "ext::sh"] {
            assert!(
                matches!(
                    check_scheme(refused, &https),
                    Err(Error::SchemeNotAllowed { .. })
                ),
                "{refused}"
            );
        }
    }

    #[test]
    fn commit_output_is_parsed_with_any_file_name() {
        let sha = "0123456789abcdef0123456789abcdef01234567";
        let commit = parse_commit(&format!(
            "created=1\n{sha}\na.txt\0dir/new\nline\0with space\0"
        ))
        .unwrap();
        assert!(commit.created);
        assert_eq!(commit.sha, sha);
        assert_eq!(
            commit.files_changed,
            ["a.txt", "dir/new\nline", "with space"]
        );
        let unchanged = parse_commit(&format!("created=0\n{sha}\n")).unwrap();
        assert!(!unchanged.created && unchanged.files_changed.is_empty());
        assert!(parse_commit("created=1\nnot-a-sha\n").is_err());
        assert!(parse_commit("").is_err());
    }

    #[test]
    fn commit_input_is_validated() {
        let good = CommitRequest {
            author_name: "Ada".to_owned(),
            author_email: "ada@example.com".to_owned(),
            message: "checkpoint".to_owned(),
        };
        assert!(commit_script(&good).is_ok());
        for bad in [
            CommitRequest {
                author_name: "Ada\nEvil: x".to_owned(),
                ..good.clone()
            },
            CommitRequest {
                author_email: "<a@b>".to_owned(),
                ..good.clone()
            },
            CommitRequest {
                author_name: "a".repeat(257),
                ..good.clone()
            },
            CommitRequest {
                message: " ".to_owned(),
                ..good.clone()
            },
        ] {
            assert!(
                matches!(commit_script(&bad), Err(Error::InvalidGitInput { .. })),
                "{bad:?}"
            );
        }
        assert!(validate_sha("0123456789abcdef0123456789abcdef01234567").is_ok());
        for bad in ["HEAD", "0123", "0123456789ABCDEF0123456789ABCDEF01234567"] {
            assert!(validate_sha(bad).is_err());
        }
    }

    #[test]
    fn the_bundle_is_taken_only_as_a_small_regular_file_of_the_uid() {
        // As root the bundle is handed to a sandbox uid; as a normal user (rootless) the
        // sandbox's uid is the test's own, and a file of it is checked against another uid.
        let own = rustix::process::geteuid().as_raw();
        let root = own == 0;
        let uid = if root { 620_999 } else { own };
        let give = |path: &Path| {
            if root {
                std::os::unix::fs::lchown(path, Some(uid), Some(uid)).unwrap();
            }
        };
        let workspace = tempfile::tempdir().unwrap();
        let scratch = tempfile::tempdir().unwrap();
        let bundle = workspace.path().join(PUSH_BUNDLE);
        let secret = scratch.path().join("host-secret");
        std::fs::write(&secret, "host only").unwrap();
        let take_as = |uid: u32, name: &str, max: u64| {
            take_bundle(workspace.path(), uid, max, &scratch.path().join(name))
        };
        let take = |name: &str, max: u64| take_as(uid, name, max);

        std::fs::write(&bundle, "bundle bytes").unwrap();
        give(&bundle);
        take("ok", 1024).unwrap();
        assert_eq!(
            std::fs::read_to_string(scratch.path().join("ok")).unwrap(),
            "bundle bytes"
        );
        assert!(!bundle.exists(), "taken bundles are deleted");

        std::os::unix::fs::symlink(&secret, &bundle).unwrap();
        let error = take("link", 1024).unwrap_err();
        assert!(matches!(error, Error::UnsafeBundle { .. }), "{error}");
        assert!(
            std::fs::symlink_metadata(&bundle).is_err(),
            "the link is removed"
        );
        assert_eq!(std::fs::read_to_string(&secret).unwrap(), "host only");

        let fifo = Command::new("mkfifo").arg(&bundle).status().unwrap();
        assert!(fifo.success());
        give(&bundle);
        let error = take("fifo", 1024).unwrap_err();
        assert!(error.to_string().contains("not a regular file"), "{error}");

        // Owned by someone else than the sandbox uid: root's as root; rootless, the test's
        // own file taken for another uid.
        std::fs::write(&bundle, "owned by another").unwrap();
        let expected = if root { uid } else { own + 1 };
        let error = take_as(expected, "other", 1024).unwrap_err();
        assert!(
            error.to_string().contains(&format!("owned by uid {own}")),
            "{error}"
        );

        std::fs::write(&bundle, vec![0u8; 2048]).unwrap();
        give(&bundle);
        let error = take("big", 1024).unwrap_err();
        assert!(error.to_string().contains("over 1024"), "{error}");
        assert!(!scratch.path().join("link").exists());
    }

    #[test]
    fn credentials_do_not_print_their_password() {
        let credentials = GitCredentials {
            username: "bot".to_owned(),
            password: "hunter2-token".to_owned(),
        };
        let printed = format!("{credentials:?}");
        assert!(
            printed.contains("bot") && !printed.contains("hunter2"),
            "{printed}"
        );
    }

    #[test]
    fn askpass_answers_from_its_environment() {
        let dir = tempfile::tempdir().unwrap();
        let askpass = dir.path().join("askpass");
        std::fs::write(&askpass, ASKPASS).unwrap();
        std::fs::set_permissions(&askpass, std::fs::Permissions::from_mode(0o700)).unwrap();
        let ask = |prompt: &str| {
            let out = Command::new(&askpass)
                .arg(prompt)
                .env("CANOPY_GIT_USERNAME", "bot")
                .env("CANOPY_GIT_PASSWORD", "s3cret $(id)")
                .output()
                .unwrap();
            String::from_utf8(out.stdout).unwrap()
        };
        assert_eq!(ask("Username for 'https://example.com': "), "bot\n");
        assert_eq!(
            ask("Password for 'https://bot@example.com': "),
            "s3cret $(id)\n"
        );
    }
}
