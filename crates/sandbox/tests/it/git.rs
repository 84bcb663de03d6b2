//! Git on a workspace: the clone runs as the sandbox uid; commit, restore and push never run
//! what the agent's `.git/config` names on the host, and a push goes where the caller says.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use canopy_sandbox::{
    CommitRequest, Error, ExecRequest, PushRequest, SandboxMode, SandboxProvider, SandboxSpec,
};
use canopy_testkit::Script;

use crate::support::{Harness, git, owner};

async fn run(h: &Harness, id: &str, script: &str) -> String {
    let output = h.provider.exec(id, ExecRequest::new(script)).await.unwrap();
    assert_eq!(output.code, Some(0), "{script}: {output:?}");
    output.stdout
}

fn checkpoint(message: &str) -> CommitRequest {
    CommitRequest {
        author_name: "Ada Lovelace".to_owned(),
        author_email: "ada@example.com".to_owned(),
        message: message.to_owned(),
    }
}

/// Every path under `dir` (links not followed) and its owner.
fn owners(dir: &Path) -> Vec<(String, u32)> {
    let mut found = vec![(dir.display().to_string(), owner(dir))];
    if std::fs::symlink_metadata(dir).is_ok_and(|meta| meta.is_dir()) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            found.extend(owners(&entry.path()));
        }
    }
    found
}

#[tokio::test]
async fn commit_restore_and_push_ignore_what_the_workspace_configures() {
    git_ops(Harness::start(Script::new()).await.unwrap()).await;
}

#[tokio::test]
async fn rootless_commit_restore_and_push_ignore_what_the_workspace_configures() {
    git_ops(Harness::start_rootless(Script::new()).await.unwrap()).await;
}

async fn git_ops(h: Harness) {
    let id = "git-ops";
    let uid = h.provider.prepare(&h.spec(id)).await.unwrap();
    let workspace = h.workspace(id);
    let not_owned: Vec<_> = owners(&workspace)
        .into_iter()
        .filter(|(_, owner)| *owner != uid)
        .collect();
    assert!(
        not_owned.is_empty(),
        "the clone is the uid's: {not_owned:?}"
    );

    // Host paths the hostile config aims at: a root-only directory and two bare repositories.
    let host = tempfile::tempdir().unwrap();
    let root_only = host.path().join("root-only");
    std::fs::create_dir(&root_only).unwrap();
    std::fs::set_permissions(&root_only, std::fs::Permissions::from_mode(0o700)).unwrap();
    let target = host.path().join("target.git");
    let decoy = host.path().join("decoy.git");
    for bare in [&target, &decoy] {
        git(
            host.path(),
            &["init", "-q", "--bare", bare.to_str().unwrap()],
        )
        .unwrap();
    }
    let target_url = format!("file://{}", target.display());
    let decoy_url = format!("file://{}", decoy.display());
    // Git appends arguments to fsmonitor and hook commands: `:` takes them.
    let marker = |name: &str| {
        format!(
            "id -u > {}/{name}; id -u > /workspace/.{name}; :",
            root_only.display()
        )
    };
    // Everything the agent could put in .git/config to run a command or redirect a push.
    run(
        &h,
        id,
        &format!(
            "set -e\n\
             mkdir -p hooks\n\
             printf '#!/bin/sh\\n{hook}\\n' > hooks/post-commit\n\
             printf '#!/bin/sh\\n{git_hook}\\n' > .git/hooks/post-commit\n\
             printf '#!/bin/sh\\n{reset_hook}\\n' > .git/hooks/post-checkout\n\
             chmod +x hooks/post-commit .git/hooks/post-commit .git/hooks/post-checkout\n\
             git config core.hooksPath /workspace/hooks\n\
             git config core.fsmonitor '{fsmonitor}'\n\
             git config url.{decoy_url}.insteadOf {target_url}\n\
             git config remote.origin.pushurl {decoy_url}\n\
             echo 'first version' > notes.txt\n",
            hook = marker("hook-ran"),
            git_hook = marker("git-hook-ran"),
            reset_hook = marker("checkout-hook-ran"),
            fsmonitor = marker("fsmonitor-ran"),
        ),
    )
    .await;

    let first = h
        .provider
        .commit(id, checkpoint("checkpoint: first"))
        .await
        .unwrap();
    assert!(first.created);
    let mut files = first.files_changed.clone();
    files.sort();
    assert_eq!(files, ["hooks/post-commit", "notes.txt"]);
    let described = run(
        &h,
        id,
        &format!(
            "git cat-file -t {sha}; git log -1 --format='%an <%ae>|%cn <%ce>|%s' {sha}",
            sha = first.sha
        ),
    )
    .await;
    assert_eq!(
        described,
        "commit\nAda Lovelace <ada@example.com>|Ada Lovelace <ada@example.com>|checkpoint: first\n"
    );

    let unchanged = h.provider.commit(id, checkpoint("nothing")).await.unwrap();
    assert!(!unchanged.created);
    assert_eq!(unchanged.sha, first.sha);
    assert!(unchanged.files_changed.is_empty());

    // Restore: tracked changes go back, untracked files go away.
    run(
        &h,
        id,
        "echo 'second version' > notes.txt && mkdir -p new && echo x > new/untracked.txt",
    )
    .await;
    h.provider.restore(id, &first.sha).await.unwrap();
    let restored = run(&h, id, "cat notes.txt; ls new 2>&1; git status --porcelain").await;
    assert!(restored.starts_with("first version\n"), "{restored}");
    assert!(restored.contains("No such file or directory"), "{restored}");
    assert!(
        matches!(
            h.provider.restore(id, "HEAD").await,
            Err(Error::InvalidGitInput { .. })
        ),
        "only a full sha"
    );

    // Push: to the caller's URL, whatever insteadOf and pushurl say.
    let pushed = h
        .provider
        .push(
            id,
            PushRequest {
                remote_url: target_url.clone(),
                branch: "canopy/git-ops".to_owned(),
                credentials: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(pushed, first.sha);
    assert_eq!(
        git(&target, &["rev-parse", "refs/heads/canopy/git-ops"])
            .unwrap()
            .trim(),
        first.sha
    );
    assert!(
        git(&decoy, &["for-each-ref"]).unwrap().trim().is_empty(),
        "nothing went to the decoy"
    );
    assert!(
        !workspace.join(".canopy-push.bundle").exists(),
        "the bundle is deleted"
    );
    for refused in [
        PushRequest {
            remote_url: target_url.clone(),
            branch: "../escape".to_owned(),
            credentials: None,
        },
        PushRequest {
            remote_url: "ext::sh -c touch% /tmp/pwned".to_owned(),
            branch: "canopy/x".to_owned(),
            credentials: None,
        },
        PushRequest {
            remote_url: "git@example.com:o/r.git".to_owned(),
            branch: "canopy/x".to_owned(),
            credentials: None,
        },
    ] {
        let error = h.provider.push(id, refused.clone()).await.unwrap_err();
        assert!(
            matches!(
                error,
                Error::InvalidBranch { .. } | Error::SchemeNotAllowed { .. }
            ),
            "{refused:?}: {error}"
        );
    }

    // Nothing the config named ran on the host, and no hook ran at all. The config is in place,
    // but every sandbox process's git (OpenCode's, the agent's, the runner's execs) has
    // fsmonitor and hooks switched off by environment, which beats the repository's config.
    let on_host: Vec<_> = std::fs::read_dir(&root_only).unwrap().flatten().collect();
    assert!(on_host.is_empty(), "ran on the host: {on_host:?}");
    for name in ["hook-ran", "git-hook-ran", "checkout-hook-ran"] {
        assert!(!workspace.join(format!(".{name}")).exists(), "{name}");
    }
    assert!(!workspace.join(".fsmonitor-ran").exists());
    let config = std::fs::read_to_string(workspace.join(".git/config")).unwrap();
    assert!(config.contains("fsmonitor"), "{config}");

    h.provider.remove(id).await.unwrap();
}

#[tokio::test]
async fn the_clone_runs_as_the_uid_within_its_scheme_time_and_size_limits() {
    let h = Harness::start_adjusted(Script::new(), |config| {
        config.clone.max_bytes = 4 << 20;
    })
    .await
    .unwrap();
    let spec = |id: &str, repository: &str| SandboxSpec {
        repository: repository.to_owned(),
        ..h.spec(id)
    };

    for (id, repository) in [
        ("scheme-ext", "ext::sh -c touch% /tmp/canopy-pwned"),
        ("scheme-ssh", "git@example.com:o/r.git"),
        ("scheme-git", "git://example.com/r.git"),
    ] {
        let error = h.provider.prepare(&spec(id, repository)).await.unwrap_err();
        assert!(
            matches!(error, Error::SchemeNotAllowed { .. }),
            "{repository}: {error}"
        );
        assert!(!h.root.join(id).exists(), "refused before anything ran");
    }

    // A source only its owner (the test's user) can read: the sandbox uid's clone fails as
    // root; rootless, the clone runs as that very user, and it succeeds.
    std::fs::set_permissions(&h.repository, std::fs::Permissions::from_mode(0o700)).unwrap();
    let cloned = h.provider.prepare(&h.spec("owner-only")).await;
    match h.mode() {
        SandboxMode::Root => {
            let error = cloned.unwrap_err();
            assert!(matches!(error, Error::Command { .. }), "{error}");
            assert!(!h.workspace("owner-only").exists());
        }
        SandboxMode::Rootless => {
            let uid = cloned.unwrap();
            assert_eq!(uid, rustix::process::geteuid().as_raw());
            assert_eq!(owner(&h.workspace("owner-only")), uid);
            assert!(h.workspace("owner-only").join("README.md").is_file());
        }
    }
    std::fs::set_permissions(&h.repository, std::fs::Permissions::from_mode(0o755)).unwrap();

    // Past the size cap (8 MiB of incompressible data against 4 MiB).
    let big: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(h.repository.join("big.bin"), big).unwrap();
    git(&h.repository, &["add", "big.bin"]).unwrap();
    git(&h.repository, &["commit", "-q", "-m", "big"]).unwrap();
    let error = h.provider.prepare(&h.spec("too-big")).await.unwrap_err();
    assert!(matches!(error, Error::CloneTooLarge { .. }), "{error}");
    assert!(!h.workspace("too-big").exists());
    assert!(
        !h.root
            .join("too-big")
            .join("data")
            .join("workspace.new")
            .exists()
    );

    let h = Harness::start_adjusted(Script::new(), |config| {
        config.clone.timeout = Duration::ZERO;
    })
    .await
    .unwrap();
    let error = h.provider.prepare(&h.spec("too-slow")).await.unwrap_err();
    assert!(matches!(error, Error::CloneTimeout { .. }), "{error}");

    // The default config allows https only: a local path is refused.
    let h = Harness::start_adjusted(Script::new(), |config| {
        config.clone = canopy_sandbox::CloneConfig::default();
    })
    .await
    .unwrap();
    let error = h.provider.prepare(&h.spec("default")).await.unwrap_err();
    match error {
        Error::SchemeNotAllowed { scheme, .. } => assert_eq!(scheme, "file"),
        other => panic!("expected a refusal, got {other}"),
    }
}
