use clap::{Parser, Subcommand};
use std::process::ExitCode;
use tokengate::{client, migrate, serve};

/// tokengate: access tokens with per-token rate limits for Envoy and Istio.
#[derive(Parser)]
#[command(name = "tokengate", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the control plane (token API and filter sync)
    Serve(Box<serve::ServeArgs>),
    /// Manage tokens through a running control plane
    Token(client::TokenArgs),
    /// Read the audit trail of a running control plane
    Audit(client::AuditArgs),
    /// Copy every token, the audit trail and the rest into an empty database (e.g. from
    /// SQLite to PostgreSQL)
    Migrate(migrate::MigrateArgs),
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve(args) => {
            tracing_subscriber::fmt()
                .with_writer(std::io::stderr)
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_env("TOKENGATE_LOG")
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
                )
                .init();
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(serve::run(*args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Token(args) => client::run(args),
        Command::Audit(args) => client::run_audit(args),
        Command::Migrate(args) => {
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(migrate::run(args)) {
                Ok(summary) => {
                    println!("{summary}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
