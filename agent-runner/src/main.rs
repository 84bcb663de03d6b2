//! The canopy-agent-runner binary. Not built yet: it exits with status 2 and says so.

fn main() -> std::process::ExitCode {
    #[allow(clippy::print_stderr)]
    {
        eprintln!("canopy-agent-runner is not built yet");
    }
    std::process::ExitCode::from(2)
}
