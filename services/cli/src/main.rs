//! `patchport`: one binary for the registry server and every client command.
//!
//! A thin layer: argument parsing, output formatting and progress bars. All behaviour
//! lives in the library crates (registry, client, engine).

mod commands;
mod output;
mod progress;

use clap::{Parser, Subcommand, ValueEnum};

/// patchport: a registry and build service for LoRA patches that keeps them alive while
/// their base models evolve.
#[derive(Debug, Parser)]
#[command(name = "patchport", version)]
struct Cli {
    /// Registry address for client commands.
    #[arg(long, env = "PATCHPORT_REGISTRY", default_value = patchport_client::DEFAULT_REGISTRY, global = true)]
    registry: String,
    /// Log format on stderr: text, or json (one object per line, with span fields).
    #[arg(
        long,
        env = "PATCHPORT_LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Text,
        global = true
    )]
    log_format: LogFormat,
    /// PEM CA certificate to trust for an https:// registry (a private CA).
    #[arg(long, env = "PATCHPORT_CA_CERT", global = true)]
    ca_cert: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the registry (embedded default: SQLite and files under ./patchport-data).
    Serve(commands::serve::ServeArgs),
    /// Base model versions.
    #[command(subcommand)]
    Base(commands::push::BaseCommand),
    /// Patch (LoRA adapter) versions.
    #[command(subcommand)]
    Patch(commands::push::PatchCommand),
    /// Download a base, patch or port by reference, every byte verified.
    Pull(commands::pull::PullArgs),
    /// List base or patch versions.
    List(commands::info::ListArgs),
    /// Show one base or patch version.
    Status(commands::info::StatusArgs),
    /// Port a patch onto a new base offline, from local directories (no server).
    Port(commands::port::PortArgs),
    /// Score a base (+ patch) on a JSONL eval set offline (accuracy or mean NLL).
    Eval(commands::eval::EvalArgs),
    /// Run a port worker against the registry (leases jobs over gRPC; no database access).
    Worker(commands::worker::WorkerArgs),
    /// Stream registry events (base.published, port.completed, ...), resumable with --from.
    Watch(commands::worker::WatchArgs),
    /// Which patch/base pairs work: native, ported (with diagnostics), queued, incompatible.
    Compat(commands::worker::CompatArgs),
    /// The exact adapter artifact of a patch for the base digest a serving engine loaded.
    Resolve(commands::worker::ResolveArgs),
    /// Queue the port of a patch onto another version of its base (answers at once; a
    /// worker does the port; --wait to wait for it).
    Request(commands::ports::RequestArgs),
    /// Cancel a queued or running port (a running worker's result is then refused).
    Cancel(commands::ports::CancelArgs),
    /// Access tokens (the client sends PATCHPORT_TOKEN; PATCHPORT_CA_CERT trusts a private CA).
    #[command(subcommand)]
    Token(commands::admin::TokenCommand),
    /// Namespace policies: anonymous read, required evaluation pass.
    #[command(subcommand)]
    Namespace(commands::admin::NamespaceCommand),
    /// The audit log of state changes (admins).
    Audit(commands::admin::AuditArgs),
    /// Ask the registry's gRPC health service; exit 0 when it is serving (for container
    /// health checks).
    Health(commands::health::HealthArgs),
    /// Print the public key (PEM) that verifies the registry's signatures, from the
    /// registry or from a private key file.
    SigningKey(commands::sign::SigningKeyArgs),
    /// Verify a pulled directory offline: model.sig over every file, and a port's
    /// provenance.json, with trusted public keys.
    Verify(commands::sign::VerifyArgs),
}

/// How logs are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (for log collectors).
    Json,
}

/// Logs go to stderr unbuffered, so nothing is left to flush at exit. No log line carries
/// a token: requests are logged by method and ids, never with their metadata.
fn init_tracing(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PATCHPORT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let default_level = if matches!(cli.command, Command::Serve(_) | Command::Worker(_)) {
        "info"
    } else {
        "warn"
    };
    init_tracing(cli.log_format, default_level);
    let _ = commands::CA_CERT.set(cli.ca_cert.clone());
    let result = match cli.command {
        Command::Serve(args) => commands::serve::run(args).await,
        Command::Base(cmd) => commands::push::run_base(&cli.registry, cmd).await,
        Command::Patch(cmd) => commands::push::run_patch(&cli.registry, cmd).await,
        Command::Pull(args) => commands::pull::run(&cli.registry, args).await,
        Command::List(args) => commands::info::list(&cli.registry, args).await,
        Command::Status(args) => commands::info::status(&cli.registry, args).await,
        Command::Port(args) => commands::port::run(args).await,
        Command::Eval(args) => commands::eval::run(args).await,
        Command::Worker(args) => commands::worker::run(&cli.registry, args).await,
        Command::Watch(args) => commands::worker::watch(&cli.registry, args).await,
        Command::Compat(args) => commands::worker::compat(&cli.registry, args).await,
        Command::Resolve(args) => commands::worker::resolve(&cli.registry, args).await,
        Command::Request(args) => commands::ports::request(&cli.registry, args).await,
        Command::Cancel(args) => commands::ports::cancel(&cli.registry, args).await,
        Command::Token(cmd) => commands::admin::token(&cli.registry, cmd).await,
        Command::Namespace(cmd) => commands::admin::namespace(&cli.registry, cmd).await,
        Command::Audit(args) => commands::admin::audit(&cli.registry, args).await,
        Command::Health(args) => commands::health::run(&cli.registry, args).await,
        Command::SigningKey(args) => commands::sign::signing_key(&cli.registry, args).await,
        Command::Verify(args) => commands::sign::verify(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
