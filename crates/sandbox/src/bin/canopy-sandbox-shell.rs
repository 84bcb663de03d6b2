//! The shell OpenCode's bash tool runs commands with inside a sandbox: see
//! `canopy_sandbox::tool_shell`.

fn main() -> std::process::ExitCode {
    canopy_sandbox::tool_shell::main()
}
