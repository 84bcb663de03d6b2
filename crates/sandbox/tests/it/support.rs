//! A provider in a temp root, a source repository, the scripted model, and a turn helper.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use canopy_opencode::{
    Agent, ClientConfig, CreateSession, ModelRef, OpenCodeClient, PermissionReply,
    PermissionRequest, Prompt, ToolState, TurnOutcome, TurnPolicy, run_turn,
};
use canopy_sandbox::{
    BubblewrapConfig, BubblewrapProvider, EgressPolicy, Limits, ModelUpstream, SandboxInfo,
    SandboxSpec,
};
use canopy_testkit::{ModelServer, SCRIPTED_MODEL_ID, Script};

pub(crate) const PROVIDER_ID: &str = "fake";

pub(crate) struct Harness {
    pub(crate) model: ModelServer,
    pub(crate) provider: Arc<BubblewrapProvider>,
    pub(crate) api_key: String,
    pub(crate) root: PathBuf,
    repository: PathBuf,
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
        let model = ModelServer::start(script).await?;
        let dir = tempfile::Builder::new()
            .prefix("canopy-sandbox-test-")
            .tempdir()?;
        let repository = dir.path().join("source");
        std::fs::create_dir_all(&repository)?;
        std::fs::write(repository.join("README.md"), "the session's repository\n")?;
        for args in [
            &["init", "-q", "-b", "main"][..],
            &["add", "README.md"],
            &[
                "-c",
                "user.name=test",
                "-c",
                "user.email=test@localhost",
                "commit",
                "-q",
                "-m",
                "initial",
            ],
        ] {
            let status = std::process::Command::new("git")
                .args(args)
                .current_dir(&repository)
                .status()
                .context("run git")?;
            anyhow::ensure!(status.success(), "git {args:?} failed");
        }
        let api_key = format!("sk-canopy-test-{}", std::process::id());
        let root = dir.path().join("sandboxes");
        let mut config = BubblewrapConfig::new(
            &root,
            ModelUpstream {
                base_url: model.base_url(),
                api_key: api_key.clone(),
            },
        );
        config.limits = limits;
        config.egress = egress;
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
        self.root.join(id).join("workspace")
    }
}

pub(crate) fn client(info: &SandboxInfo) -> Result<OpenCodeClient> {
    Ok(OpenCodeClient::new(
        ClientConfig::unix_socket(&info.opencode_socket).with_directory(&info.opencode_directory),
    )?)
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

/// Runs one prompt; any permission request fails the test (the sandbox config allows all).
pub(crate) async fn turn(
    client: &OpenCodeClient,
    session: &str,
    text: &str,
) -> Result<TurnOutcome> {
    let mut refuse = |request: &PermissionRequest| -> PermissionReply {
        panic!("the sandbox's config should ask nothing: {request:?}")
    };
    Ok(run_turn(client, session, &prompt(text), &mut refuse, &policy()).await?)
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

/// Waits until no host process runs as `uid` (teardown of a killed sandbox is asynchronous).
pub(crate) async fn wait_no_processes_of(uid: u32, within: Duration) -> Vec<u32> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let left = processes_of(uid);
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
