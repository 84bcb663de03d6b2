//! The `canopy` operator CLI.

fn main() -> anyhow::Result<()> {
    canopy::run()
}
