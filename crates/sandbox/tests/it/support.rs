//! A provider in a temp root, a source repository, the scripted model, and a turn helper.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use canopy_opencode::{
    Agent, CreateSession, ModelRef, OpenCodeClient, PermissionReply, PermissionRequest, Prompt,
    ToolState, TurnOutcome, TurnPolicy, run_turn,
};
use canopy_sandbox::{
    BubblewrapConfig, BubblewrapProvider, EgressPolicy, Limits, ModelUpstream, SandboxInfo,
    SandboxMode, SandboxSpec,
};
use canopy_testkit::{ModelServer, SCRIPTED_MODEL_ID, Script};

pub(crate) const PROVIDER_ID: &str = "fake";
/// `1`: every harness runs its provider rootless, also as root (the whole suite in that mode).
const FORCE_ROOTLESS_ENV: &str = "CANOPY_TEST_SANDBOX_ROOTLESS";

pub(crate) struct Harness {
    pub(crate) model: ModelServer,
    pub(crate) provider: Arc<BubblewrapProvider>,
    pub(crate) api_key: String,
    pub(crate) root: PathBuf,
    /// The source repository (a local path, owned by root).
    pub(crate) repository: PathBuf,
    _dir: tempfile::TempDir,
}

impl Harness {
    pub(crate) async fn start(script: Script) -> Result<Self> {
        Self::start_with(script, Limits::default()).await
    }

    pub(crate) async fn start_with(script: Script, limits: Limits) -> Result<Self> {
        Self::start_configured(script, limits, EgressPolicy::Deny).await
    }

    pub(crate) async fn start_configured(
        script: Script,
        limits: Limits,
        egress: EgressPolicy,
    ) -> Result<Self> {
        Self::start_adjusted(script, move |config| {
            config.limits = limits;
            config.egress = egress;
        })
        .await
    }

    /// A harness whose provider config is the tests' default changed by `adjust`.
    pub(crate) async fn start_adjusted(
        script: Script,
        adjust: impl FnOnce(&mut BubblewrapConfig),
    ) -> Result<Self> {
        let model = ModelServer::start(script).await?;
        let dir = tempfile::Builder::new()
            .prefix("canopy-sandbox-test-")
            .tempdir()?;
        // The clone runs as the sandbox uid: it must be able to read the source.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let repository = dir.path().join("source");
        std::fs::create_dir_all(&repository)?;
        std::fs::write(repository.join("README.md"), "the session's repository\n")?;
        git(&repository, &["init", "-q", "-b", "main"])?;
        git(&repository, &["add", "README.md"])?;
        git(&repository, &["commit", "-q", "-m", "initial"])?;
        let api_key = format!("sk-canopy-test-{}", std::process::id());
        let root = dir.path().join("sandboxes");
        let mut config = BubblewrapConfig::new(
            &root,
            ModelUpstream {
                base_url: model.base_url(),
                api_key: api_key.clone(),
            },
        );
        config.shell_binary = Some(PathBuf::from(env!("CARGO_BIN_EXE_canopy-sandbox-shell")));
        config.clone.allowed_schemes = vec!["https".to_owned(), "file".to_owned()];
        config.force_rootless = std::env::var_os(FORCE_ROOTLESS_ENV).is_some_and(|v| v == "1");
        adjust(&mut config);
        let provider = Arc::new(BubblewrapProvider::new(config)?);
        Ok(Self {
            model,
            provider,
            api_key,
            root,
            repository,
            _dir: dir,
        })
    }

    /// A harness whose provider runs rootless whoever runs the test.
    pub(crate) async fn start_rootless(script: Script) -> Result<Self> {
        let h = Self::start_adjusted(script, |config| config.force_rootless = true).await?;
        anyhow::ensure!(h.mode() == SandboxMode::Rootless, "forced rootless");
        Ok(h)
    }

    pub(crate) fn mode(&self) -> SandboxMode {
        self.provider.mode()
    }

    pub(crate) fn spec(&self, id: &str) -> SandboxSpec {
        SandboxSpec {
            id: id.to_owned(),
            repository: self.repository.to_string_lossy().into_owned(),
            branch: format!("canopy/{id}"),
            provider_id: PROVIDER_ID.to_owned(),
            model_id: SCRIPTED_MODEL_ID.to_owned(),
        }
    }

    /// Where the sandbox `id` keeps its workspace on the host.
    pub(crate) fn workspace(&self, id: &str) -> PathBuf {
        self.root.join(id).join("data").join("workspace")
    }
}

/// Whatever a test mounted under its root is unmounted when the harness goes, even when the
/// test failed (a stopped or removed sandbox has nothing mounted; a failed test may).
impl Drop for Harness {
    fn drop(&mut self) {
        for point in mounts_under(&self.root) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&point)
                .status();
        }
    }
}

/// The mount points of this process's namespace under `dir` (mountinfo's 5th field).
pub(crate) fn mounts_under(dir: &Path) -> Vec<String> {
    let prefix = format!("{}/", dir.display());
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .filter(|point| point.starts_with(&prefix))
        .map(str::to_owned)
        .collect()
}

/// The loop devices whose backing file is `image`.
pub(crate) fn loops_backed_by(image: &Path) -> Vec<String> {
    let Ok(devices) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    devices
        .flatten()
        .filter(|device| {
            std::fs::read_to_string(device.path().join("loop/backing_file"))
                .is_ok_and(|backing| Path::new(backing.trim_end()) == image)
        })
        .map(|device| device.file_name().to_string_lossy().into_owned())
        .collect()
}

/// Runs host-side git in a test's own repository (never in a workspace).
pub(crate) fn git(dir: &Path, args: &[&str]) -> Result<String> {
    let output = std::process::Command::new("git")
        .args(["-c", "user.name=test", "-c", "user.email=test@localhost"])
        .args(args)
        .current_dir(dir)
        .output()
        .context("run git")?;
    anyhow::ensure!(
        output.status.success(),
        "git {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

pub(crate) fn client(info: &SandboxInfo) -> Result<OpenCodeClient> {
    Ok(OpenCodeClient::new(info.client_config())?)
}

pub(crate) async fn titled_session(client: &OpenCodeClient) -> Result<String> {
    Ok(client
        .create_session(&CreateSession {
            title: Some("sandbox test".to_owned()),
            ..CreateSession::default()
        })
        .await?
        .id)
}

pub(crate) fn prompt(text: &str) -> Prompt {
    Prompt::text(
        Agent::Build,
        ModelRef::new(PROVIDER_ID, SCRIPTED_MODEL_ID),
        text,
    )
}

/// Runs one prompt, allowing each bash call and outside path once (the runner is the gate;
/// these tests probe the sandbox behind it); any other permission request fails the test.
pub(crate) async fn turn(
    client: &OpenCodeClient,
    session: &str,
    text: &str,
) -> Result<TurnOutcome> {
    let mut bash_only = |request: &PermissionRequest| -> PermissionReply {
        assert!(
            ["bash", "external_directory"].contains(&request.permission.as_str()),
            "the sandbox's config should ask only for bash and outside paths: {request:?}"
        );
        PermissionReply::Once
    };
    Ok(run_turn(client, session, &prompt(text), &mut bash_only, &policy()).await?)
}

pub(crate) fn policy() -> TurnPolicy {
    TurnPolicy {
        inactivity_timeout: Duration::from_secs(60),
        turn_timeout: Duration::from_secs(120),
        max_model_retries: 0,
        max_truncated_steps: 2,
        max_steps: 20,
        abort_timeout: Duration::from_secs(10),
    }
}

/// The output of every completed tool call of the turn, in order.
pub(crate) fn tool_outputs(outcome: &TurnOutcome) -> Vec<String> {
    outcome
        .tool_parts()
        .iter()
        .map(|tool| match &tool.state {
            ToolState::Completed { output, .. } => output.clone(),
            ToolState::Error { error, .. } => format!("ERROR: {error}"),
            other => format!("UNFINISHED: {other:?}"),
        })
        .collect()
}

/// Host processes whose real uid is `uid`.
fn processes_of(uid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .and_then(|status| {
                    let line = status.lines().find(|line| line.starts_with("Uid:"))?;
                    line.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(uid)
        })
        .collect()
}

/// Host processes whose mount namespace binds something of the sandbox directory `dir`
/// (rootless sandboxes share the invoking user's uid: their mounts tell them apart).
fn processes_mounting(dir: &Path) -> Vec<u32> {
    let needle = format!(" {}/", dir.display());
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
                .is_ok_and(|mounts| mounts.contains(&needle))
        })
        .collect()
}

/// The host processes of the sandbox `id` (of host uid `uid`): as root, every process of the
/// uid; rootless, every process with its directories mounted.
pub(crate) fn sandbox_processes(h: &Harness, id: &str, uid: u32) -> Vec<u32> {
    match h.mode() {
        SandboxMode::Root => processes_of(uid),
        SandboxMode::Rootless => processes_mounting(&h.root.join(id)),
    }
}

/// Waits until no host process of the sandbox `id` is left (teardown of a killed sandbox is
/// asynchronous): as root, none runs as its `uid`; rootless, none has its directories mounted.
pub(crate) async fn wait_no_processes_of(
    h: &Harness,
    id: &str,
    uid: u32,
    within: Duration,
) -> Vec<u32> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let left = sandbox_processes(h, id, uid);
        if left.is_empty() || tokio::time::Instant::now() >= deadline {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) fn owner(path: &Path) -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .map(|meta| meta.uid())
        .unwrap_or(u32::MAX)
}
