//! The production topology on loopback (deploy/README.md): a 3-node NATS JetStream cluster from
//! the installed nats-server, the event stream with 3 replicas, and two of each service as
//! separate processes. Under a load of commands, while `canopy demo` drives a whole session,
//! one NATS node and one of each service are killed with SIGKILL; the demo's session still
//! completes, nothing is lost, and the read models equal a rebuild.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::canopy;
use crate::stack::{
    Kind, Load, Servers, Service, Wiring, assert_healed, report, wait_for_answers, wait_healthy,
};

/// Three nats-server nodes routed to each other, JetStream on each.
struct NatsCluster {
    dir: PathBuf,
    client_ports: Vec<u16>,
    route_ports: Vec<u16>,
    nodes: Vec<Option<Child>>,
}

impl NatsCluster {
    fn start(dir: &Path) -> Self {
        let free = || canopy_local_servers::free_port().unwrap();
        let mut cluster = Self {
            dir: dir.join("nats-cluster"),
            client_ports: (0..3).map(|_| free()).collect(),
            route_ports: (0..3).map(|_| free()).collect(),
            nodes: Vec::new(),
        };
        std::fs::create_dir_all(&cluster.dir).unwrap();
        for node in 0..3 {
            let child = cluster.spawn(node);
            cluster.nodes.push(Some(child));
        }
        cluster
    }

    fn spawn(&self, node: usize) -> Child {
        let routes: Vec<String> = self
            .route_ports
            .iter()
            .map(|port| format!("nats-route://127.0.0.1:{port}"))
            .collect();
        let config = format!(
            "server_name: n{node}\nlisten: 127.0.0.1:{client}\n\
             jetstream {{ store_dir: \"{store}\" }}\n\
             cluster {{ name: canopy-test, listen: 127.0.0.1:{route}, routes: [{routes}] }}\n",
            client = self.client_ports[node],
            store = self.dir.join(format!("n{node}")).display(),
            route = self.route_ports[node],
            routes = routes.join(", "),
        );
        let path = self.dir.join(format!("n{node}.conf"));
        std::fs::write(&path, config).unwrap();
        let log = std::fs::File::create(self.dir.join(format!("n{node}.log"))).unwrap();
        Command::new(canopy_local_servers::nats_server_binary().unwrap())
            .arg("-c")
            .arg(&path)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    }

    /// Every node, comma-separated, as each service is configured in production.
    fn urls(&self) -> String {
        self.client_ports
            .iter()
            .map(|port| format!("nats://127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Waits until JetStream answers through the cluster (a meta leader is elected).
    async fn wait_ready(&self) {
        let client =
            canopy_config::connect_nats(&self.urls(), "cluster-test", Duration::from_secs(60))
                .await
                .unwrap();
        let jetstream = async_nats::jetstream::new(client);
        let deadline = Instant::now() + Duration::from_secs(90);
        // a replicated stream can be created once the cluster has a meta leader and its peers
        let probe = async_nats::jetstream::stream::Config {
            name: "READY".to_owned(),
            subjects: vec!["ready.probe".to_owned()],
            num_replicas: 3,
            ..Default::default()
        };
        while let Err(error) = jetstream.create_stream(probe.clone()).await {
            assert!(
                Instant::now() < deadline,
                "the NATS cluster never got ready: {error}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        jetstream.delete_stream("READY").await.unwrap();
    }

    async fn kill(&mut self, node: usize) {
        let mut child = self.nodes[node].take().unwrap();
        child.kill().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_nats_cluster_and_two_of_each_service_lose_a_node_and_one_of_each_and_the_demo_completes()
{
    let servers = Servers::postgres_only();
    let base = servers.wiring();
    let mut cluster = NatsCluster::start(&base.logs);
    cluster.wait_ready().await;
    let wiring = Wiring {
        nats_url: cluster.urls(),
        ..base
    };
    let bin = canopy().parent().unwrap().to_owned();
    let free = || canopy_local_servers::free_port().unwrap();
    let command_ports = [free(), free()];
    let query_ports = [free(), free()];
    let command_apis: Vec<String> = command_ports
        .iter()
        .map(|port| format!("http://127.0.0.1:{port}"))
        .collect();
    let query_apis: Vec<String> = query_ports
        .iter()
        .map(|port| format!("http://127.0.0.1:{port}"))
        .collect();
    let replicas = ("CANOPY_STREAM_REPLICAS", "3".to_owned());

    let mut command = Vec::new();
    for (i, port) in command_ports.iter().enumerate() {
        let name = ["command-api-a", "command-api-b"][i];
        command.push(
            Service::start(
                name,
                bin.join("canopy-command-api"),
                &[],
                &wiring,
                &[("CANOPY_COMMAND_API_ADDR", format!("127.0.0.1:{port}"))],
                None,
            )
            .await,
        );
        wait_healthy(&command_apis[i]).await;
    }
    let mut relays = Vec::new();
    for name in ["relay-a", "relay-b"] {
        relays.push(
            Service::start(
                name,
                canopy(),
                &["relay"],
                &wiring,
                std::slice::from_ref(&replicas),
                None,
            )
            .await,
        );
    }
    let mut projectors = Vec::new();
    for name in ["projectors-a", "projectors-b"] {
        projectors.push(
            Service::start(name, bin.join("canopy-projectors"), &[], &wiring, &[], None).await,
        );
    }
    let mut queries = Vec::new();
    for (i, port) in query_ports.iter().enumerate() {
        let name = ["query-api-a", "query-api-b"][i];
        queries.push(
            Service::start(
                name,
                bin.join("canopy-query-api"),
                &[],
                &wiring,
                &[("CANOPY_QUERY_API_ADDR", format!("127.0.0.1:{port}"))],
                None,
            )
            .await,
        );
        wait_healthy(&query_apis[i]).await;
    }
    let sandboxes = wiring.logs.join("sandboxes");
    let mut runners = Vec::new();
    for (i, id) in ["runner-a", "runner-b"].into_iter().enumerate() {
        runners.push(Some(
            Service::start(
                id,
                bin.join("canopy-agent-runner"),
                &[],
                &wiring,
                &[
                    ("CANOPY_RUNNER_ID", id.to_owned()),
                    ("CANOPY_RUNNER_ADDR", "127.0.0.1:0".to_owned()),
                    (
                        "CANOPY_COMMAND_API_URL",
                        format!("{},{}", command_apis[i], command_apis[1 - i]),
                    ),
                    (
                        "CANOPY_SANDBOX_ROOT",
                        sandboxes.join(id).display().to_string(),
                    ),
                    ("CANOPY_RUNNER_GIT_SCHEMES", "https,file".to_owned()),
                    ("CANOPY_RUNNER_LEASE", "10s".to_owned()),
                    ("RUST_LOG", "info".to_owned()),
                ],
                None,
            )
            .await,
        ));
    }

    let load = Load::over(&command_apis, 4, 8, Kind::Learnings).await;
    let so_far = load.answered();
    wait_for_answers(&load, so_far + 50).await;

    // the demo, against the a-side of each API
    let mut demo = Command::new(canopy())
        .arg("demo")
        .args([
            "--command-api",
            &command_apis[0],
            "--query-api",
            &query_apis[0],
        ])
        .arg("--dir")
        .arg(wiring.logs.join("demo"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(wiring.logs.join("demo.log")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(demo.stdout.take().unwrap()).lines();
    let session = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some((_, id)) = line.split_once("started session ") {
                return id.trim().to_owned();
            }
        }
        panic!("the demo started no session");
    })
    .await
    .unwrap();
    let printed = tokio::spawn(async move {
        let mut all = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            all.push(line);
        }
        all
    });

    // one of each, under load, while the demo runs
    let so_far = load.answered();
    wait_for_answers(&load, so_far + 50).await;
    cluster.kill(2).await;
    relays.remove(0).kill().await;
    projectors.remove(0).kill().await;
    queries.remove(1).kill().await;
    command.remove(1).kill().await;
    // the runner that does not drive the demo's session (a build cut off mid-way is failed on
    // takeover, not run twice; that is the runner tests' subject)
    let driver = demo_driver(&wiring.database_url, &session).await;
    let victim = usize::from(driver.as_deref() == Some("runner-a"));
    runners[victim].take().unwrap().kill().await;
    let restarted = Instant::now();

    let finished = tokio::time::timeout(Duration::from_secs(300), demo.wait())
        .await
        .expect("the demo did not finish in 5 minutes")
        .unwrap();
    let printed = printed.await.unwrap();
    assert!(
        finished.success(),
        "the demo failed:\n{}",
        printed.join("\n")
    );
    assert!(
        printed.iter().any(|line| line.contains("BranchPushed")),
        "{}",
        printed.join("\n")
    );
    let so_far = load.answered();
    wait_for_answers(&load, so_far + 20).await;
    let accepted = load.finish().await;
    let healed = assert_healed(&wiring, &accepted, restarted).await;
    report(
        "3-node NATS cluster, one node and one of each service killed",
        &healed,
        accepted.len(),
    );

    for service in command
        .into_iter()
        .chain(relays)
        .chain(projectors)
        .chain(queries)
        .chain(runners.into_iter().flatten())
    {
        service.stop().await;
    }
}

/// The runner holding the session's lease, when one does.
async fn demo_driver(database_url: &str, session: &str) -> Option<String> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(database_url)
        .await
        .unwrap();
    let owner = sqlx::query_scalar("SELECT owner FROM runner_leases WHERE session_id = $1")
        .bind(session)
        .fetch_optional(&pool)
        .await
        .unwrap();
    pool.close().await;
    owner
}
