//! The server process: isolation, basic auth, the unix-socket transport, and stopping.

use std::path::Path;
use std::time::Duration;

use canopy_opencode::{
    BasicAuth, ClientConfig, CreateSession, Event, OPENCODE_VERSION, OpenCodeClient,
};
use canopy_testkit::Script;
use futures::StreamExt;
use tokio::net::{TcpStream, UnixListener};

use crate::support::{Harness, Setup};

/// Serves `socket` by forwarding each connection to `target`, as the sandbox bridge does.
fn bridge(socket: &Path, target: String) -> tokio::task::JoinHandle<()> {
    let listener = UnixListener::bind(socket).unwrap();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let target = target.clone();
            tokio::spawn(async move {
                if let Ok(mut outbound) = TcpStream::connect(&target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    })
}

fn environ(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/environ"))
        .unwrap()
        .split(|byte| *byte == 0)
        .filter(|entry| !entry.is_empty())
        .map(|entry| String::from_utf8_lossy(entry).into_owned())
        .collect()
}

#[tokio::test]
async fn a_password_server_is_reached_over_tcp_and_a_unix_socket_then_stopped() {
    let setup = Setup {
        password: Some("s3cret".to_owned()),
        ..Setup::default()
    };
    let h = Harness::start_with(Script::new(), setup).await.unwrap();

    // Isolated: its own HOME and config by environment, nothing inherited it does not need.
    let env = environ(h.server.pid());
    let home = h.server.state_dir().join("home");
    assert!(env.contains(&format!("HOME={}", home.display())), "{env:?}");
    let tmp = h.server.state_dir().join("tmp");
    assert!(
        env.contains(&format!("TMPDIR={}", tmp.display())),
        "{env:?}"
    );
    assert!(env.contains(&"OPENCODE_DISABLE_MODELS_FETCH=1".to_owned()));
    assert!(
        env.iter()
            .any(|entry| entry.starts_with("OPENCODE_CONFIG_CONTENT={"))
    );
    assert!(std::env::var("CARGO_MANIFEST_DIR").is_ok());
    assert!(
        !env.iter().any(|entry| entry.starts_with("CARGO_")),
        "{env:?}"
    );

    // Basic auth on every endpoint.
    let health_url = format!("{}/global/health", h.server.base_url());
    let anonymous = reqwest::get(&health_url).await.unwrap();
    assert_eq!(anonymous.status(), 401);
    assert_eq!(h.client.health().await.unwrap().version, OPENCODE_VERSION);
    let wrong = OpenCodeClient::new(
        h.server
            .client_config()
            .with_auth(Some(BasicAuth::opencode("wrong"))),
    )
    .unwrap();
    let error = wrong.health().await.unwrap_err();
    assert!(
        matches!(error, canopy_opencode::Error::Status { status: 401, .. }),
        "{error:?}"
    );

    // The same API over a unix socket, events included.
    let socket = h.server.state_dir().join("opencode.sock");
    let address = h.server.base_url().trim_start_matches("http://").to_owned();
    let bridge = bridge(&socket, address);
    let over_socket = OpenCodeClient::new(
        ClientConfig::unix_socket(&socket)
            .with_auth(h.server.auth().cloned())
            .with_directory(h.project()),
    )
    .unwrap();
    assert!(over_socket.health().await.unwrap().healthy);
    let mut events = over_socket.events().await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(first, Event::ServerConnected), "{first:?}");
    let session = over_socket
        .create_session(&CreateSession {
            title: Some("over a socket".to_owned()),
            ..CreateSession::default()
        })
        .await
        .unwrap();
    let created = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(event) = events.next().await {
            if let Event::SessionCreated { info, .. } = event.unwrap() {
                return info;
            }
        }
        panic!("the event stream ended")
    })
    .await
    .unwrap();
    assert_eq!(created.id, session.id);
    assert_eq!(Path::new(&created.directory), h.project());
    assert_eq!(
        h.client.session(&session.id).await.unwrap().title,
        "over a socket"
    );
    bridge.abort();

    // SIGTERM stops it; the API is gone with it.
    let pid = h.server.pid();
    let Harness { server, client, .. } = h;
    let status = server.stop().await.unwrap();
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "{status:?}");
    assert!(client.health().await.is_err());
}
