//! The `canopy` CLI's subcommands, run in-process against a real database.

use canopy::{Command, DatabaseArgs, RoleArg, TokenArgs, execute};
use canopy_auth::{AuthConfig, Verifier};
use canopy_domain::Role;

/// Every subcommand's settings fit in one command: `canopy up` flattens several services'
/// configurations, and clap refuses an argument or group declared twice.
#[test]
fn every_subcommand_declares_each_setting_once() {
    use clap::CommandFactory;
    canopy::Cli::command().debug_assert();
}

#[tokio::test]
async fn migrate_is_idempotent() {
    let db = canopy_testkit::database().await.unwrap();
    for _ in 0..2 {
        let out = execute(Command::Migrate(DatabaseArgs {
            database_url: Some(db.url.clone()),
        }))
        .await
        .unwrap();
        assert_eq!(
            out,
            format!(
                "migrations applied: {}",
                canopy_event_store::MIGRATOR.iter().count()
            )
        );
    }
}

#[tokio::test]
async fn token_mints_a_verifiable_jwt_for_each_role() {
    let secret = "cli-test-secret-0123456789";
    let verifier = Verifier::new(&AuthConfig {
        hs256_secret: secret.into(),
        accept_hs256: true,
        rs256_public_key_pem: None,
        runner_secret: None,
        leeway_secs: 0,
    })
    .unwrap();
    for (arg, role) in [
        (RoleArg::Owner, Role::Owner),
        (RoleArg::Admin, Role::Admin),
        (RoleArg::Member, Role::Member),
        (RoleArg::Viewer, Role::Viewer),
        (RoleArg::Auditor, Role::Auditor),
        (RoleArg::Runner, Role::Runner),
    ] {
        let token = execute(Command::Token(TokenArgs {
            role: arg,
            user: "u7".into(),
            name: "Grace".into(),
            email: Some("grace@example.invalid".into()),
            workspace: "w9".into(),
            ttl: std::time::Duration::from_secs(3600),
            secret: canopy_config::JwtSecretArgs::new(secret),
        }))
        .await
        .unwrap();
        let claims = verifier.verify(&token).unwrap();
        assert_eq!(claims.role, role);
        assert_eq!(claims.sub, "u7");
        let expected_workspace = (role != Role::Runner).then(|| "w9".to_owned());
        assert_eq!(claims.workspace_id, expected_workspace);
    }
}

mod audit;
mod up;
