//! A hostile agent: its own bash tool tries to read host secrets, reach host services and other
//! sandboxes, and to turn the runner's socket into a path to a host socket.

use std::time::Duration;

use canopy_opencode::TurnEnd;
use canopy_sandbox::{Error, ExecRequest, ModelUpstream, SandboxMode, SandboxProvider};
use canopy_testkit::{Script, Step};
use futures::{FutureExt, StreamExt};
use serde_json::json;

use crate::support::{Harness, client, titled_session, tool_outputs, turn};
use crate::upstream::{Upstream, completions};

fn bash(command: String) -> Step {
    Step::tool(
        "bash",
        json!({ "command": command, "description": "probe", "timeout": 60000 }),
    )
}

fn port_of(url: &str) -> u16 {
    let authority = url.split("://").nth(1).unwrap_or(url);
    let host_port = authority.rsplit('@').next().unwrap_or(authority);
    let host_port = host_port.split('/').next().unwrap_or(host_port);
    host_port
        .rsplit(':')
        .next()
        .and_then(|port| port.parse().ok())
        .unwrap_or_else(|| panic!("no port in {url}"))
}

#[tokio::test]
async fn agent_bash_cannot_reach_host_secrets_services_or_other_sandboxes() {
    hostile_agent(false).await;
}

/// The same probes with the provider rootless, whoever runs the test: as root this is the
/// unprivileged path (no uid lease, no chown, no setpriv, bwrap's own user namespace).
#[tokio::test]
async fn rootless_agent_bash_cannot_reach_host_secrets_services_or_other_sandboxes() {
    hostile_agent(true).await;
}

async fn hostile_agent(force_rootless: bool) {
    let pg = port_of(&canopy_testkit::pg_server().await.unwrap().url);
    let nats = port_of(&canopy_testkit::nats_server().await.unwrap().url);
    // The probes below mean something only if the services answer on the host.
    for port in [pg, nats] {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap_or_else(|error| panic!("host service on {port} is not listening: {error}"));
    }

    // Placeholders: the harness knows the paths only once it exists.
    let h = if force_rootless {
        Harness::start_rootless(Script::new()).await.unwrap()
    } else {
        Harness::start(Script::new()).await.unwrap()
    };
    let mode = h.mode();
    let other = h.spec("other-session");
    let other_uid = h.provider.prepare(&other).await.unwrap();
    let secret = "other-sandbox-secret-7f3a";
    let wrote = h
        .provider
        .exec(
            "other-session",
            ExecRequest::new(format!("echo {secret} > secret.txt && id -u")),
        )
        .await
        .unwrap();
    assert_eq!(wrote.code, Some(0), "{wrote:?}");
    assert_eq!(wrote.stdout.trim(), mode.uid_inside(other_uid).to_string());
    let other_ws = h.workspace("other-session");
    let host_home = std::env::var("HOME").unwrap_or_else(|_| "/root".to_owned());

    h.model.push([
        bash(format!(
            "cat /etc/shadow; ls {host_home}; cat {}/secret.txt; ls /run/canopy-host; id -u; \
             echo \"uid_map: $(awk '{{print $1 \"/\" $3}}' /proc/self/uid_map | tr '\\n' ' ')\"; \
             echo \"caps: $(awk '/^CapEff/ {{print $2}}' /proc/self/status)\"",
            other_ws.display()
        )),
        bash(
            "echo \"environ-bytes: $(cat /proc/1/environ | wc -c)\"; echo \"pid1: $(cat /proc/1/comm)\"; \
             env; for f in /proc/[0-9]*/environ /proc/[0-9]*/cmdline; do tr '\\0' ' ' < \"$f\"; echo; done; \
             grep -rsl sk- /home /workspace /tmp /run /etc 2>/dev/null | head; echo probed-env"
                .to_owned(),
        ),
        bash(format!(
            "for port in 5432 4222 {pg} {nats}; do if (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; \
             then echo \"port $port: open\"; else echo \"port $port: refused\"; fi; done; \
             (exec 3<>/dev/tcp/10.0.0.1/80) 2>&1; cat /proc/net/dev | tail -n +3 | cut -d: -f1"
        )),
        Step::text("Probed."),
    ]);
    let info = h.provider.start(h.spec("hostile")).await.unwrap();
    let own_uid = rustix::process::geteuid().as_raw();
    match mode {
        SandboxMode::Root => {
            assert_ne!(info.uid, other_uid, "every sandbox has its own uid");
            assert_ne!(info.uid, own_uid);
        }
        SandboxMode::Rootless => {
            // One host uid for all: the namespaces (checked below) keep them apart.
            assert_eq!(info.uid, other_uid);
            assert_eq!(info.uid, own_uid, "runs as the invoking user");
        }
    }
    let client = client(&info).unwrap();
    let session = titled_session(&client).await.unwrap();

    let outcome = turn(&client, &session, "Look around.").await.unwrap();

    assert_eq!(outcome.end, TurnEnd::Completed);
    let outputs = tool_outputs(&outcome);
    assert_eq!(outputs.len(), 3, "{outputs:#?}");
    let files = &outputs[0];
    assert!(
        files.contains("/etc/shadow: No such file or directory"),
        "{files}"
    );
    assert!(
        files.contains(&format!(
            "cannot access '{host_home}': No such file or directory"
        )),
        "{files}"
    );
    assert!(
        files.contains(&format!(
            "{}/secret.txt: No such file or directory",
            other_ws.display()
        )),
        "{files}"
    );
    assert!(!files.contains(secret), "{files}");
    let inside = mode.uid_inside(info.uid);
    assert!(
        files.contains(&format!("\n{inside}\n")),
        "runs as its own uid: {files}"
    );
    // Its own user namespace, where exactly one uid (its own) maps to the host uid.
    assert!(
        files.contains(&format!("uid_map: {inside}/1 \n")),
        "{files}"
    );
    assert!(files.contains("caps: 0000000000000000"), "{files}");

    let env = &outputs[1];
    assert!(
        env.contains("environ-bytes: 0"),
        "bwrap's init must have an empty env: {env}"
    );
    assert!(
        env.contains("pid1: bwrap"),
        "a private pid namespace: {env}"
    );
    // The probe did read OpenCode's own environment (its config names the placeholder key)...
    assert!(
        env.contains(canopy_sandbox::SANDBOX_API_KEY_PLACEHOLDER),
        "{env}"
    );
    assert!(env.contains("probed-env"), "{env}");
    // ...and the real key is nowhere in it, nor in any file it could grep.
    assert!(
        !env.contains(&h.api_key),
        "the API key leaked into the sandbox: {env}"
    );
    assert!(
        !env.contains("DATABASE_URL") && !env.contains("CARGO"),
        "host env leaked: {env}"
    );

    let net = &outputs[2];
    for port in [5432, 4222, pg, nats] {
        assert!(net.contains(&format!("port {port}: refused")), "{net}");
        assert!(!net.contains(&format!("port {port}: open")), "{net}");
    }
    assert!(net.contains("Network is unreachable"), "{net}");
    assert_eq!(
        net.lines().filter(|line| line.trim() == "lo").count(),
        1,
        "only lo: {net}"
    );

    // The proxy added the key upstream; the sandbox sent only the placeholder.
    let requests = h.model.requests();
    assert!(!requests.is_empty());
    for request in &requests {
        assert_eq!(
            request.header("authorization"),
            Some(format!("Bearer {}", h.api_key).as_str())
        );
        assert!(!request.body.to_string().contains(&h.api_key));
    }

    h.provider.remove("hostile").await.unwrap();
    h.provider.remove("other-session").await.unwrap();
}

#[tokio::test]
async fn swapping_the_socket_for_a_symlink_is_refused() {
    let h = Harness::start(Script::new()).await.unwrap();
    // A host socket the agent would like the runner to talk to instead.
    let decoy_dir = tempfile::tempdir().unwrap();
    let decoy_path = decoy_dir.path().join("decoy.sock");
    let decoy = tokio::net::UnixListener::bind(&decoy_path).unwrap();
    let info = h.provider.start(h.spec("swapper")).await.unwrap();
    // The agent's own tools cannot write /run/canopy (the tool shell's Landlock domain), but
    // any process of the sandbox uid could: swap it from an exec, which has no such guard.
    let swapped = h
        .provider
        .exec(
            "swapper",
            ExecRequest::new(format!(
                "mv /run/canopy/opencode.sock /run/canopy/real.sock && ln -s {} /run/canopy/opencode.sock && ls -l /run/canopy",
                decoy_path.display()
            )),
        )
        .await
        .unwrap();
    assert!(swapped.stdout.contains("opencode.sock ->"), "{swapped:?}");

    let refused = h.provider.connect_opencode("swapper").await.unwrap_err();
    match &refused {
        Error::UnsafeSocket { reason, .. } => {
            assert!(reason.contains("Symlink"), "{reason}")
        }
        other => panic!("expected a refusal, got {other}"),
    }
    let fresh = canopy_opencode::OpenCodeClient::new(info.client_config()).unwrap();
    assert!(fresh.health_within(Duration::from_secs(2)).await.is_err());
    let stats = h.provider.bridge_stats("swapper").await.unwrap();
    assert!(stats.refused() >= 1);
    assert!(stats.last_refusal().unwrap().contains("not a socket"));
    assert!(
        decoy.accept().now_or_never().is_none(),
        "the runner side connected to the decoy"
    );

    h.provider.remove("swapper").await.unwrap();
}

#[tokio::test]
async fn agent_tools_cannot_use_opencode_read_its_password_or_write_its_home() {
    let h = Harness::start(Script::new()).await.unwrap();
    h.model.push([
        bash(
            "socat TCP-LISTEN:5000,bind=127.0.0.1,fork,reuseaddr SYSTEM:'echo hi' & sleep 0.3; \
             for port in 4096 8080 5000; do if (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; \
             then echo \"tcp $port: open\"; else echo \"tcp $port: refused\"; fi; done; kill %1; \
             echo \"curl tcp: $(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:4096/permission)\"; \
             echo \"curl unix: $(curl -s -o /dev/null -w '%{http_code}' --unix-socket /run/canopy/opencode.sock http://opencode/permission)\""
                .to_owned(),
        ),
        bash(
            "pid=$(for p in /proc/[0-9]*; do [ \"$(cat $p/comm 2>/dev/null)\" = opencode ] && basename $p; done | head -1); \
             echo \"opencode pid: $pid\"; \
             if cat /proc/$pid/environ >/dev/null 2>&1; then echo 'environ: readable'; else echo 'environ: denied'; fi; \
             if head -c 1 /proc/$pid/mem >/dev/null 2>&1; then echo 'mem: readable'; else echo 'mem: denied'; fi; \
             if kill -0 $pid 2>/dev/null; then echo 'signal: sent'; else echo 'signal: denied'; fi; \
             grep -a -l OPENCODE_SERVER_PASSWORD /proc/[0-9]*/environ 2>/dev/null; \
             echo \"opencode vars: $(env | grep -c '^OPENCODE_')\"; \
             echo \"host dir: $(ls /run/canopy-host | tr '\\n' ' ')\"; \
             echo \"home: $HOME $XDG_CONFIG_HOME\"; tr '\\0' ' ' < /proc/1/cmdline; echo"
                .to_owned(),
        ),
        bash(
            "for path in /home/sandbox/probe /home/sandbox/.local/share/opencode/opencode.db /run/canopy/probe /opt/canopy/probe; do \
             if : >> \"$path\" 2>/dev/null; then echo \"write $path: ok\"; else echo \"write $path: denied\"; fi; done; \
             echo normal > /workspace/tool-wrote.txt && echo 'workspace write: ok'; \
             touch \"$HOME/x\" && mkdir -p \"$XDG_CONFIG_HOME/app\" && echo 'tool home: ok'; \
             git status --short && echo 'git: ok'"
                .to_owned(),
        ),
        Step::text("Probed."),
    ]);
    let info = h.provider.start(h.spec("closed")).await.unwrap();
    assert!(
        !h.root.join("closed/host/opencode-password").exists(),
        "the password file is gone once OpenCode is healthy"
    );
    let client = client(&info).unwrap();
    let session = titled_session(&client).await.unwrap();

    let outcome = turn(&client, &session, "Try to get out.").await.unwrap();

    assert_eq!(outcome.end, TurnEnd::Completed);
    let outputs = tool_outputs(&outcome);
    assert_eq!(outputs.len(), 3, "{outputs:#?}");
    let password = &info.opencode_auth.password;
    for output in &outputs {
        assert!(!output.contains(password.as_str()), "{output}");
    }
    let net = &outputs[0];
    for expected in [
        "tcp 4096: refused",
        "tcp 8080: refused",
        "tcp 5000: open",
        "curl tcp: 000",
        "curl unix: 401",
    ] {
        assert!(net.contains(expected), "{expected}: {net}");
    }
    let secrets = &outputs[1];
    assert!(
        !secrets.contains("opencode pid: \n"),
        "found OpenCode: {secrets}"
    );
    for expected in [
        "environ: denied",
        "mem: denied",
        "signal: denied",
        "opencode vars: 0",
        "host dir: model.sock ",
        "home: /tmp/tool-home /tmp/tool-home/.config",
    ] {
        assert!(secrets.contains(expected), "{expected}: {secrets}");
    }
    assert!(!secrets.contains("/environ"), "password found: {secrets}");
    let writes = &outputs[2];
    for path in [
        "/home/sandbox/probe",
        "/home/sandbox/.local/share/opencode/opencode.db",
        "/run/canopy/probe",
        "/opt/canopy/probe",
    ] {
        assert!(
            writes.contains(&format!("write {path}: denied")),
            "{path}: {writes}"
        );
    }
    for expected in [
        "workspace write: ok",
        "tool home: ok",
        "?? tool-wrote.txt",
        "git: ok",
    ] {
        assert!(writes.contains(expected), "{expected}: {writes}");
    }
    assert_eq!(
        std::fs::read_to_string(h.workspace("closed").join("tool-wrote.txt")).unwrap(),
        "normal\n"
    );

    // The runner's client has the password; one without it is refused.
    assert!(client.health().await.unwrap().healthy);
    let anonymous = canopy_opencode::OpenCodeClient::new(
        canopy_opencode::ClientConfig::unix_socket(&info.opencode_socket),
    )
    .unwrap();
    assert!(
        anonymous
            .health_within(Duration::from_secs(2))
            .await
            .is_err()
    );

    h.provider.remove("closed").await.unwrap();
}

#[tokio::test]
async fn sandbox_processes_reach_only_chat_completions_through_the_model_socket() {
    let fake = Upstream::start(completions).await;
    let key = "sk-escape-test-key";
    let base_url = fake.base_url();
    let h = Harness::start_adjusted(Script::new(), move |config| {
        config.model = ModelUpstream {
            base_url,
            api_key: key.to_owned(),
        };
    })
    .await
    .unwrap();
    h.provider.start(h.spec("model-probe")).await.unwrap();

    // Any process of the sandbox uid can connect to the model socket; the exec has no guard.
    let probe = r#"
probe() { printf '%s %s -> ' "$1" "$2"; curl -sS --path-as-is --unix-socket /run/canopy-host/model.sock \
  -o /dev/null -w '%{http_code}\n' -X "$1" -H 'content-type: application/json' -d '{}' "http://127.0.0.1:8080$2"; }
probe POST '/v1/%2e%2e/%2e%2e/secret'
probe GET '/v1/%2e%2e/%2e%2e/secret'
probe POST '/v1/chat%2fcompletions'
probe GET '/v1/files'
probe POST '/v1/files'
probe POST '/v1/batches'
probe DELETE '/v1/models/m'
probe POST '/v1/chat/completions'
"#;
    let out = h
        .provider
        .exec("model-probe", ExecRequest::new(probe))
        .await
        .unwrap();
    let text = format!("{}{}", out.stdout, out.stderr);

    for line in text.lines().filter(|line| line.contains(" -> ")) {
        let allowed = line.starts_with("POST /v1/chat/completions ");
        let status = line.rsplit(' ').next().unwrap_or_default();
        if allowed {
            assert_eq!(status, "200", "{text}");
        } else {
            assert!(["403", "404", "405"].contains(&status), "{line}\n{text}");
        }
    }
    assert_eq!(text.matches(" -> ").count(), 8, "{text}");
    let seen = fake.seen();
    assert!(
        seen.iter()
            .all(|s| s.target == "/v1/chat/completions" || s.target == "/v1/models"),
        "the proxy reached other paths with the key: {seen:#?}"
    );
    assert!(
        seen.iter()
            .any(|s| s.authorization.as_deref() == Some(&*format!("Bearer {key}"))),
        "{seen:#?}"
    );
    let usage = h.provider.model_usage("model-probe").await.unwrap();
    assert_eq!(usage.refused(), 7, "{:?}", usage.last_refusal());
    assert_eq!(usage.calls(), 1);

    h.provider.remove("model-probe").await.unwrap();
}

/// A server the sandbox puts in OpenCode's place: it answers any API call with 200 MB of JSON
/// and the event stream with one 100 MB event, then stops when `/workspace/.stop` appears (or
/// the workspace is gone, or after a minute).
const IMPOSTOR: &str = r#"
cat > /tmp/serve.sh <<'SCRIPT'
read -r method target version
case "$target" in
  */event*) printf 'HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\ndata: '
            head -c 100000000 /dev/zero | tr '\0' a; printf '\n\n' ;;
  *) printf 'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n'
     head -c 200000000 /dev/zero | tr '\0' ' ' ;;
esac
SCRIPT
rm -f /run/canopy/opencode.sock
socat UNIX-LISTEN:/run/canopy/opencode.sock,fork,mode=600 SYSTEM:'bash /tmp/serve.sh' &
# Until the test says stop, the test's files are gone, or a minute passed.
for _ in $(seq 600); do [ -e /workspace/.stop ] || [ ! -e /workspace/README.md ] && break; sleep 0.1; done
kill %1
"#;

/// Creates the file that ends [`IMPOSTOR`], also when the test fails: the exec would otherwise
/// run on and keep the test's runtime from shutting down.
struct StopImpostor(std::path::PathBuf);

impl Drop for StopImpostor {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.0, "");
    }
}

#[tokio::test]
async fn a_process_posing_as_opencode_cannot_make_the_host_read_without_bound() {
    let h = Harness::start(Script::new()).await.unwrap();
    let info = h.provider.start(h.spec("impostor")).await.unwrap();
    let stop = StopImpostor(h.workspace("impostor").join(".stop"));
    let provider = h.provider.clone();
    let impostor =
        tokio::spawn(async move { provider.exec("impostor", ExecRequest::new(IMPOSTOR)).await });

    // Until the impostor listens, the real OpenCode answers. A fresh client each time: a pooled
    // connection would stay with the real one.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let error = loop {
        match client(&info).unwrap().sessions().await {
            Ok(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(_) => panic!("the impostor never took OpenCode's place"),
            Err(error) => break error.to_string(),
        }
    };
    assert!(error.contains("larger than"), "{error}");

    let mut events = client(&info).unwrap().events().await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(30), events.next())
        .await
        .expect("the event stream answered");
    match first {
        Some(Err(error)) => assert!(error.to_string().contains("larger than"), "{error}"),
        other => panic!("expected the oversized event to end the stream: {other:?}"),
    }

    drop(stop);
    let done = tokio::time::timeout(Duration::from_secs(30), impostor)
        .await
        .expect("the impostor stopped")
        .unwrap();
    assert!(done.is_ok(), "{done:?}");
    h.provider.remove("impostor").await.unwrap();
}

#[tokio::test]
async fn a_seccomp_filter_denies_the_kernel_surface_a_build_never_needs() {
    let h = Harness::start(Script::new()).await.unwrap();
    let spec = h.spec("seccomp-session");
    h.provider.prepare(&spec).await.unwrap();
    // x86-64 numbers: each call is one an unprivileged process may make without the filter
    // (a key, an io_uring, a userfaultfd in user mode), or one the filter must refuse before
    // the kernel's own checks (bpf, perf events, mount); ENOSYS (38) is the filter's answer
    let probe = r#"
        my %calls = (add_key => [248, "user", "k", "v", 1, -3], keyctl => [250, 0, -3],
            io_uring_setup => [425, 1, "\0" x 120], userfaultfd => [323, 1],
            bpf => [321, 0, "\0" x 128, 128], perf_event_open => [298, "\0" x 128, 0, -1, -1, 0],
            mount => [165, "none", "/canopy-no-such-dir", "tmpfs", 0, 0]);
        for my $name (sort keys %calls) {
            my ($nr, @args) = @{$calls{$name}};
            $! = 0;
            my $r = syscall($nr, @args);
            printf "%s %d %d\n", $name, $r, $! + 0;
        }
        printf "getpid %d\n", syscall(39) > 0 ? 1 : 0;
    "#;
    assert!(!probe.contains('\''));
    let out = h
        .provider
        .exec(
            "seccomp-session",
            ExecRequest::new(format!("/usr/bin/perl -e '{probe}'")),
        )
        .await
        .unwrap();
    assert_eq!(out.code, Some(0), "{out:?}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    for name in [
        "add_key",
        "bpf",
        "io_uring_setup",
        "keyctl",
        "mount",
        "perf_event_open",
        "userfaultfd",
    ] {
        assert!(
            lines.contains(&format!("{name} -1 38").as_str()),
            "{name} was not denied by the filter: {}",
            out.stdout
        );
    }
    assert!(lines.contains(&"getpid 1"), "{}", out.stdout);
}
