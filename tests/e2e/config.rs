//! README's configuration table is what the binaries accept: every variable a binary reads is in
//! the table, and every variable in the table is read by a binary (or by the few places listed
//! below that read the environment themselves).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::canopy;

/// The service binaries, each its own process when the stack is scaled out (beside `canopy`).
const SERVICES: [&str; 5] = [
    "canopy-command-api",
    "canopy-query-api",
    "canopy-projectors",
    "canopy-agent-runner",
    "canopy-webhooks",
];

/// Variables read with `std::env::var` rather than declared to clap (so no `--help` shows them),
/// each with a file that reads it. Keep this list short: a setting belongs in clap.
const READ_OUTSIDE_CLAP: [(&str, &str); 6] = [
    // the fallbacks of CANOPY_DATABASE_URL and CANOPY_NATS_URL (and the test kit's servers)
    ("DATABASE_URL", "crates/config/src/lib.rs"),
    ("NATS_URL", "crates/config/src/lib.rs"),
    // where the agent runner finds its helper binaries
    ("CANOPY_SANDBOX_SHELL_BIN", "crates/sandbox/src/local.rs"),
    ("CANOPY_OPENCODE_BIN", "crates/opencode/src/binary.rs"),
    // the drift tests rewrite their snapshots instead of failing
    ("CANOPY_UPDATE_OPENAPI", "crates/http/src/contract.rs"),
    (
        "CANOPY_UPDATE_SCHEMAS",
        "crates/domain/tests/it/schema_drift.rs",
    ),
];

#[test]
fn readme_configuration_table_lists_exactly_what_the_binaries_read() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();

    // Every command's --help, `canopy`'s subcommands found from its own help, so a new one is
    // never left out. Each must print its help: a setting declared twice in one command makes
    // clap panic (debug builds check).
    let mut read_by: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut commands = vec![vec![canopy()]];
    let bin = canopy().parent().unwrap().to_owned();
    for service in SERVICES {
        let binary = bin.join(service);
        assert!(
            binary.exists(),
            "build it first: cargo build --workspace --bins ({binary:?})"
        );
        commands.push(vec![binary]);
    }
    let mut seen = Vec::new();
    while let Some(command) = commands.pop() {
        let help = help(&command);
        let name = display(&command);
        for variable in env_names(&help) {
            read_by.entry(variable).or_default().insert(name.clone());
        }
        for sub in subcommands(&help) {
            let mut sub_command = command.clone();
            sub_command.push(PathBuf::from(sub));
            commands.push(sub_command);
        }
        seen.push(name);
    }
    for expected in [
        "canopy up",
        "canopy relay",
        "canopy rebuild",
        "canopy parked",
        "canopy migrate",
        "canopy demo",
        "canopy token",
    ] {
        assert!(
            seen.iter().any(|name| name == expected),
            "`{expected} --help` was not run: {seen:?}"
        );
    }

    // The variables read outside clap are still read where this list says.
    for (variable, file) in READ_OUTSIDE_CLAP {
        let source = std::fs::read_to_string(root.join(file)).unwrap();
        assert!(
            source.contains(&format!("\"{variable}\"")),
            "{file} no longer reads {variable}: update READ_OUTSIDE_CLAP"
        );
        assert!(
            !read_by.contains_key(variable),
            "{variable} is a clap setting now ({:?}): drop it from READ_OUTSIDE_CLAP",
            read_by[variable]
        );
        read_by
            .entry(variable.to_owned())
            .or_default()
            .insert(file.to_owned());
    }

    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let documented = readme_variables(&readme);
    let undocumented: Vec<String> = read_by
        .iter()
        .filter(|(variable, _)| !documented.contains(*variable))
        .map(|(variable, by)| format!("{variable} (read by {})", join(by)))
        .collect();
    let unread: Vec<&String> = documented
        .iter()
        .filter(|variable| !read_by.contains_key(*variable))
        .collect();
    assert!(
        undocumented.is_empty() && unread.is_empty(),
        "README.md's configuration table differs from what the binaries read.\n\
         missing from the table:\n  {}\n\
         in the table but read by nothing:\n  {}",
        undocumented.join("\n  "),
        unread
            .iter()
            .map(|v| v.as_str())
            .collect::<Vec<_>>()
            .join("\n  "),
    );
}

/// `<command> --help`, which must succeed.
fn help(command: &[PathBuf]) -> String {
    let output = std::process::Command::new(&command[0])
        .args(&command[1..])
        .arg("--help")
        // values do not matter, and none of the caller's should leak into the output
        .env_clear()
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "`{} --help` failed ({}):\n{stdout}\n{}",
        display(command),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn display(command: &[PathBuf]) -> String {
    command
        .iter()
        .enumerate()
        .map(|(i, part)| {
            if i == 0 {
                part.file_name().unwrap().to_string_lossy().into_owned()
            } else {
                part.to_string_lossy().into_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The variables clap shows as `[env: NAME=value]` (or `[env: NAME]` when values are hidden).
fn env_names(help: &str) -> BTreeSet<String> {
    help.split("[env:")
        .skip(1)
        .map(|rest| {
            rest.trim_start()
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect::<String>()
        })
        .filter(|name| !name.is_empty())
        .collect()
}

/// The subcommands a help text lists under `Commands:` (without `help`).
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|line| line.trim() != "Commands:")
        .skip(1)
        .take_while(|line| !line.trim().is_empty())
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_owned)
        .collect()
}

/// The variables named in the first column of README's configuration table (`CANOPY_*`, and the
/// `DATABASE_URL` / `NATS_URL` fallbacks; tooling variables like `RUST_LOG` are not checked).
fn readme_variables(readme: &str) -> BTreeSet<String> {
    let section = readme
        .split("\n## Configuration")
        .nth(1)
        .expect("README.md has a ## Configuration section");
    let section = section.split("\n## ").next().unwrap();
    section
        .lines()
        .filter(|line| line.starts_with("| `"))
        .flat_map(|line| {
            line.split('|')
                .nth(1)
                .unwrap()
                .split(", ")
                .map(|name| name.trim().trim_matches('`').to_owned())
                .collect::<Vec<_>>()
        })
        .filter(|name| name.starts_with("CANOPY_") || name == "DATABASE_URL" || name == "NATS_URL")
        .collect()
}

fn join(names: &BTreeSet<String>) -> String {
    names.iter().cloned().collect::<Vec<_>>().join(", ")
}

/// The public development secret signs any token anyone likes: both APIs refuse to start with it
/// on an address other hosts can reach, before they touch anything, and say what to set.
#[test]
fn the_apis_refuse_the_public_dev_secret_off_loopback() {
    let bin = canopy().parent().unwrap().to_owned();
    for (binary, addr) in [
        ("canopy-command-api", "CANOPY_COMMAND_API_ADDR"),
        ("canopy-query-api", "CANOPY_QUERY_API_ADDR"),
    ] {
        let output = std::process::Command::new(bin.join(binary))
            .env_clear()
            .env(addr, "0.0.0.0:0")
            // a database that is never reached: the refusal comes first
            .env("CANOPY_DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&output.stderr).into_owned()
            + &String::from_utf8_lossy(&output.stdout);
        assert!(!output.status.success(), "{binary} started: {said}");
        assert!(
            said.contains("public development secret") && said.contains("CANOPY_JWT_SECRET"),
            "{binary}: {said}"
        );
    }
}
