//! Egress: none by default; with an allow-list, only the host-side proxy, which refuses
//! addresses, unlisted names and names that resolve inside the host. No test needs the internet:
//! every refusal happens before the proxy would connect anywhere.

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use canopy_opencode::TurnEnd;
use canopy_sandbox::{EgressPolicy, ExecRequest, Limits, SandboxProvider};
use canopy_testkit::{Script, Step};
use serde_json::json;

use crate::support::{Harness, client, titled_session, tool_outputs, turn};

#[tokio::test]
async fn by_default_a_sandbox_has_no_route_no_names_and_no_proxy() {
    let h = Harness::start(Script::new()).await.unwrap();
    let spec = h.spec("no-egress");
    h.provider.prepare(&spec).await.unwrap();

    let out = h
        .provider
        .exec(
            "no-egress",
            ExecRequest::new(
                "env | grep -i proxy || echo 'no proxy env'; \
                 echo \"routes: $(tail -n +2 /proc/net/route | wc -l)\"; \
                 curl -sS --max-time 5 https://registry.npmjs.org/ 2>&1; echo \"curl exit: $?\"; \
                 (exec 3<>/dev/tcp/127.0.0.1/3128) 2>&1; echo \"proxy port exit: $?\"; \
                 ls /run/canopy-host",
            ),
        )
        .await
        .unwrap();

    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(text.contains("no proxy env"), "{text}");
    assert!(text.contains("routes: 0"), "no route at all: {text}");
    // 6: the name does not resolve (no DNS in the sandbox).
    assert!(text.contains("curl exit: 6"), "{text}");
    assert!(text.contains("Connection refused"), "{text}");
    assert!(!text.contains("egress.sock"), "{text}");
    assert!(h.provider.egress_stats("no-egress").await.is_none());
    assert!(!h.root.join("no-egress/host/egress.sock").exists());

    h.provider.remove("no-egress").await.unwrap();
}

/// Asks the proxy for `target` the way any client would, ignoring `NO_PROXY`.
fn curl_via_proxy(target: &str) -> String {
    format!(
        "curl -sS --max-time 10 --noproxy '' -x \"$HTTPS_PROXY\" -o /dev/null {target} 2>&1; echo \"exit $?\""
    )
}

#[tokio::test]
async fn allowed_egress_goes_only_through_the_proxy_which_refuses_the_host_inside() {
    // No real registry on the list: OpenCode itself fetches from npm once it may, and the test
    // must neither depend on that nor send anything off the host.
    let policy = EgressPolicy::AllowHosts(vec!["localhost".into()]);
    let h = Harness::start_configured(Script::new(), Limits::default(), policy)
        .await
        .unwrap();
    let spec = h.spec("egress");
    let uid = h.provider.prepare(&spec).await.unwrap();

    // A fresh exec: the bridge is up before the script runs.
    let out = h
        .provider
        .exec(
            "egress",
            ExecRequest::new(format!(
                "env | grep -E '^(HTTPS_PROXY|NO_PROXY|npm_config_https_proxy)=' | sort; \
                 echo \"routes: $(tail -n +2 /proc/net/route | wc -l)\"; \
                 {}; {}",
                curl_via_proxy("https://127.0.0.1:5432/"),
                curl_via_proxy("https://example.com/"),
            )),
        )
        .await
        .unwrap();
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(
        text.contains("HTTPS_PROXY=http://127.0.0.1:3128\n"),
        "{text}"
    );
    assert!(text.contains("NO_PROXY=localhost,127.0.0.1,::1"), "{text}");
    assert!(
        text.contains("npm_config_https_proxy=http://127.0.0.1:3128"),
        "{text}"
    );
    assert!(text.contains("routes: 0"), "still no route: {text}");
    // 56: curl got the proxy's 403 to its CONNECT.
    assert_eq!(text.matches("exit 56").count(), 2, "{text}");
    assert_eq!(text.matches("403").count(), 2, "{text}");
    let stats = h.provider.egress_stats("egress").await.unwrap();
    assert_eq!(stats.refused(), 2);
    assert!(
        stats
            .last_refusal()
            .unwrap()
            .contains("example.com:443: not in the allowed hosts"),
        "{:?}",
        stats.last_refusal()
    );

    // The proxy's socket: the sandbox uid's, 0600, in the root-owned read-only host dir.
    let socket = std::fs::symlink_metadata(h.root.join("egress/host/egress.sock")).unwrap();
    assert_eq!(socket.uid(), uid);
    assert_eq!(socket.permissions().mode() & 0o777, 0o600);

    // OpenCode with the proxy environment still reaches its model (loopback stays direct),
    // and its agent gets the same refusals.
    h.model.push([
        Step::tool(
            "bash",
            json!({
                "command": format!("{}; {}", curl_via_proxy("https://localhost/"), curl_via_proxy("https://10.0.0.1/")),
                "description": "egress probe",
            }),
        ),
        Step::text("Refused."),
    ]);
    let info = h.provider.start(spec).await.unwrap();
    let client = client(&info).unwrap();
    let session = titled_session(&client).await.unwrap();
    let outcome = turn(&client, &session, "Reach out.").await.unwrap();
    assert_eq!(outcome.end, TurnEnd::Completed);
    let outputs = tool_outputs(&outcome);
    assert_eq!(outputs[0].matches("exit 56").count(), 2, "{outputs:?}");
    let refusals = stats.recent_refusals();
    for reason in [
        "localhost:443: resolves to 127.0.0.1, a non-public address",
        "10.0.0.1:443: an IP literal",
    ] {
        assert!(refusals.iter().any(|r| r == reason), "{refusals:#?}");
    }
    // These four at least; OpenCode itself asks for registry.npmjs.org, which is unlisted.
    assert!(stats.refused() >= 4, "{refusals:#?}");
    assert_eq!(stats.tunnels(), 0);

    h.provider.remove("egress").await.unwrap();
}
