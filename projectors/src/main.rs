//! The canopy-projectors binary. Not built yet: it exits with status 2 and says so.

fn main() -> std::process::ExitCode {
    #[allow(clippy::print_stderr)]
    {
        eprintln!("canopy-projectors is not built yet");
    }
    std::process::ExitCode::from(2)
}
