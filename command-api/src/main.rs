//! The canopy-command-api binary. Not built yet: it exits with status 2 and says so.

fn main() -> std::process::ExitCode {
    #[allow(clippy::print_stderr)]
    {
        eprintln!("canopy-command-api is not built yet");
    }
    std::process::ExitCode::from(2)
}
