use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};
use std::io::{IsTerminal, Write};
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
    #[command(after_help = client::EXIT_CODES)]
    Token(client::TokenArgs),
    /// Manage scopes (named sets of method and path rules a token may be limited to)
    #[command(after_help = client::EXIT_CODES)]
    Scope(client::ScopeArgs),
    /// Read the audit trail of a running control plane
    #[command(after_help = client::EXIT_CODES)]
    Audit(client::AuditArgs),
    /// Copy every token, the audit trail and the rest into an empty database (e.g. from
    /// SQLite to PostgreSQL)
    Migrate(migrate::MigrateArgs),
    /// Print a shell completion script, e.g. `tokengate completions bash > /etc/bash_completion.d/tokengate`
    Completions {
        /// bash, zsh, fish, elvish or powershell
        shell: clap_complete::Shell,
    },
}

/// Logs go to stderr: plain text (coloured only on a terminal, and not with `NO_COLOR`), or
/// one JSON object per line.
fn init_logs(format: serve::LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TOKENGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match format {
        serve::LogFormat::Json => logs.json().flatten_event(true).init(),
        serve::LogFormat::Text => {
            let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            logs.with_ansi(colour).init()
        }
    }
}

/// Where the admin credential was given: on the command line or in the environment (it is
/// a global option, so it may sit at any level of the command).
fn admin_token_origin(mut m: &ArgMatches) -> Option<client::Origin> {
    let mut origin = None;
    loop {
        if let Ok(Some(_)) = m.try_get_one::<String>("admin_token") {
            origin = match m.value_source("admin_token") {
                Some(ValueSource::CommandLine) => Some(client::Origin::Flag),
                Some(ValueSource::EnvVariable) => Some(client::Origin::Env),
                _ => origin,
            };
        }
        match m.subcommand() {
            Some((_, sub)) => m = sub,
            None => return origin,
        }
    }
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    match cli.command {
        Command::Serve(args) => {
            init_logs(args.log_format);
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
        Command::Token(mut args) => {
            args.conn.admin_token_from = admin_token_origin(&matches);
            client::run(args)
        }
        Command::Scope(mut args) => {
            args.conn.admin_token_from = admin_token_origin(&matches);
            client::run_scope(args)
        }
        Command::Audit(mut args) => {
            args.conn.admin_token_from = admin_token_origin(&matches);
            client::run_audit(args)
        }
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
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "tokengate", &mut script);
            match std::io::stdout().write_all(&script) {
                Ok(()) => ExitCode::SUCCESS,
                // `tokengate completions bash | head` is not a failure.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: cannot write the script: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
