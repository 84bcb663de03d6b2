//! One OpenCode server per test, against its own scripted model, in its own temp dirs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use canopy_opencode::{
    Agent, CreateSession, OpenCodeClient, OpenCodeConfig, OpenCodeServer, PermissionAction, Prompt,
    ProviderConfig, ServerConfig, Session,
};
use canopy_testkit::{ModelServer, SCRIPTED_MODEL_ID, Script};

pub(crate) struct Harness {
    pub(crate) model: ModelServer,
    pub(crate) server: OpenCodeServer,
    pub(crate) client: OpenCodeClient,
    pub(crate) provider: ProviderConfig,
    project: PathBuf,
    _dir: tempfile::TempDir,
}

/// What a test changes about the server it starts.
pub(crate) struct Setup {
    pub(crate) bash: PermissionAction,
    pub(crate) password: Option<String>,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            bash: PermissionAction::Allow,
            password: None,
        }
    }
}

impl Harness {
    pub(crate) async fn start(script: Script) -> Result<Self> {
        Self::start_with(script, Setup::default()).await
    }

    pub(crate) async fn start_with(script: Script, setup: Setup) -> Result<Self> {
        let model = ModelServer::start(script).await?;
        let dir = tempfile::Builder::new()
            .prefix("canopy-opencode-test-")
            .tempdir()?;
        let project = dir.path().join("project");
        std::fs::create_dir_all(&project)?;
        // A repository without commits, like a fresh checkout would have one; OpenCode
        // snapshots each step with git.
        let init = std::process::Command::new("git")
            .args(["init", "-q"])
            .current_dir(&project)
            .status()
            .context("run git init")?;
        anyhow::ensure!(init.success(), "git init failed");
        let provider = ProviderConfig {
            provider_id: "fake".to_owned(),
            base_url: model.base_url(),
            api_key: "test-key".to_owned(),
            model_id: SCRIPTED_MODEL_ID.to_owned(),
        };
        let config = OpenCodeConfig::new(provider.clone()).permission("bash", setup.bash);
        let mut server_config =
            ServerConfig::new(dir.path().join("state"), &project, config.to_json());
        server_config.password = setup.password;
        let server = OpenCodeServer::start(server_config).await?;
        let client = server.client()?;
        Ok(Self {
            model,
            server,
            client,
            provider,
            project,
            _dir: dir,
        })
    }

    pub(crate) fn project(&self) -> &Path {
        &self.project
    }

    pub(crate) fn prompt(&self, agent: Agent, text: &str) -> Prompt {
        Prompt::text(agent, self.provider.model(), text)
    }

    /// A session with a title, so OpenCode makes no title request.
    pub(crate) async fn titled_session(&self, title: &str) -> Result<Session> {
        Ok(self
            .client
            .create_session(&CreateSession {
                title: Some(title.to_owned()),
                ..CreateSession::default()
            })
            .await?)
    }
}

/// Short limits, so failure detection takes seconds. The inactivity timeout still leaves room
/// for a first prompt, which boots the instance and loads plugins without session events.
pub(crate) fn quick_policy() -> canopy_opencode::TurnPolicy {
    canopy_opencode::TurnPolicy {
        inactivity_timeout: Duration::from_secs(10),
        turn_timeout: Duration::from_secs(60),
        max_model_retries: 0,
        max_truncated_steps: 2,
        max_steps: 20,
        abort_timeout: Duration::from_secs(10),
    }
}
