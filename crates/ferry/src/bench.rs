//! `ferry bench`: a load generator (filled in below).

/// Options of `ferry bench`.
#[derive(clap::Args)]
pub struct BenchArgs {}

/// Runs the benchmark.
pub fn run(_args: BenchArgs) -> std::process::ExitCode {
    std::process::ExitCode::FAILURE
}
