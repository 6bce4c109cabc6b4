//! The `imhost` binary: parse the configuration, set up logging, bind, run.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use imhost::config::Options;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "imhost",
    version,
    about = "Clustered WebSocket IM server with WebAssembly plugins"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// TOML file with any of the settings below (flags and variables win over it).
    #[arg(long, env = "IMHOST_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    options: Options,
}

#[derive(Subcommand)]
enum Command {
    /// Work with plugins offline.
    Plugin {
        #[command(subcommand)]
        action: PluginCommand,
    },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Loads FILE.wasm (and FILE.toml beside it) as the server would and prints
    /// its hooks, ABI version and hash as JSON; exits 1 with the reason if the
    /// server would refuse it. For CI pipelines.
    Check { file: PathBuf },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Plugin {
        action: PluginCommand::Check { file },
    }) = &cli.command
    {
        return check_plugin(file);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("imhost=info")),
        )
        .init();

    let file = match &cli.config {
        Some(path) => Options::from_file(path)?,
        None => Options::default(),
    };
    let config = cli
        .options
        .or(file)
        .resolve()
        .context("invalid configuration")?;

    // Each socket is a file descriptor: take all the hard limit allows.
    if let Err(err) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::warn!(cause = %err, "could not raise the open-file limit");
    }
    let listener = imhost::server::bind(config.listen)
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    imhost::server::run(listener, config, shutdown_signal()).await
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(cause = %err, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::error!(cause = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}

fn check_plugin(file: &std::path::Path) -> anyhow::Result<()> {
    match imhost::plugins::check_file(file) {
        Ok(info) => {
            let json = serde_json::to_string_pretty(&info)?;
            println!("{json}");
            Ok(())
        }
        Err(err) => {
            eprintln!("{}: refused: {err}", file.display());
            std::process::exit(1);
        }
    }
}
