//! `sqlx::migrate!` embeds `migrations/` at build time; tell cargo to rebuild when a migration
//! is added or changed (on stable Rust the macro alone only tracks files that existed before).

fn main() {
    println!("cargo:rerun-if-changed=../../migrations");
}
