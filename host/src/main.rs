//! The `imhost` binary: parse the configuration, set up logging, bind, run.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use imhost::config::Options;
use tracing_subscriber::EnvFilter;

/// mimalloc, not glibc's malloc: a plugin build on several threads spent
/// most of its waits on glibc's arena locks (3,000-5,000 context switches in
/// one 12 MB baseline build, about 300 with mimalloc, and 13 % less CPU;
/// `docs/plugins.md`, "The allocator"). Only the binary: a program
/// embedding the library keeps its own allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// How log lines look on standard error: `text` for people, `json` (one
    /// object per line) for log collectors. `RUST_LOG` sets the level
    /// (default `imhost=info`).
    #[arg(
        long,
        env = "IMHOST_LOG_FORMAT",
        value_name = "FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(flatten)]
    options: Options,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Work with plugins offline.
    Plugin {
        #[command(subcommand)]
        action: PluginCommand,
    },
    /// Work with configuration files offline.
    Config {
        #[command(subcommand)]
        action: ConfigCommand,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Reads FILE and checks it as the server would at start-up (with the
    /// flags and `IMHOST_*` variables of this invocation over it); prints
    /// `FILE: valid` or the first problem, naming its key, and exits 1.
    Check { file: PathBuf },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Loads NAME.wasm (and NAME.toml beside it) with the server's own loader:
    /// the same name rules and manifest, a compile, and one instantiation (its
    /// start code) in a sandboxed store. Prints its hooks, ABI version, hash
    /// and state as JSON; exits 1 with the reason if the server would refuse
    /// or ignore it. For CI pipelines.
    Check {
        file: PathBuf,
        /// Compiler tier to check with.
        #[arg(long, default_value = "optimized")]
        tier: imhost::plugins::engine::Tier,
        /// Also store the optimized build in this cache, for servers using it.
        #[arg(long, value_name = "DIR")]
        cache_dir: Option<PathBuf>,
    },
    /// Compiles FILE.wasm (`-`: standard input) for this exact engine into the
    /// artifact cache DIR, so a server using that cache loads it without
    /// compiling; with `--output -`, writes the artifact to standard output
    /// instead (how the server compiles, in a child process).
    Compile {
        file: PathBuf,
        #[arg(long, default_value = "optimized")]
        tier: imhost::plugins::engine::Tier,
        /// The cache directory (default: the server's default cache).
        #[arg(long, value_name = "DIR", conflicts_with = "output")]
        cache_dir: Option<PathBuf>,
        /// `-`: write the artifact to standard output.
        #[arg(long, value_name = "-")]
        output: Option<String>,
    },
}

fn main() -> anyhow::Result<()> {
    without_transparent_huge_pages();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(run())
}

/// Turns transparent huge pages off for this process and its children (the
/// plugin compilers), before the runtime's threads start;
/// `MIMALLOC_ALLOW_THP=1` keeps them. mimalloc asks for huge pages on its
/// heap by default. A huge page is 2 MiB zeroed at its first touch, and on
/// virtual machines whose host takes back free 2 MiB blocks that touch also
/// faults on the host (our reading of it; see the docs): the 12 MB baseline
/// build a swap waits for took 0.9 or 1.3-1.6 s by which block it got,
/// against a steady 1.0 s without, and a node that loaded its plugins from
/// the cache held a quarter more memory (`docs/plugins.md`, "Huge pages").
/// The socket core measured the same either way.
fn without_transparent_huge_pages() {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
        // The operator chose; mimalloc read it at its start.
        return;
    }
    // SAFETY: PR_SET_THP_DISABLE takes an integer flag and touches no memory
    // of ours; a kernel without it answers EINVAL, which changes nothing.
    #[allow(unsafe_code)]
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match &cli.command {
        Some(Command::Plugin { action }) => return plugin_command(action).await,
        Some(Command::Config {
            action: ConfigCommand::Check { file },
        }) => {
            Options::from_file(file)
                .and_then(|from_file| cli.options.clone().or(from_file).resolve())
                .with_context(|| format!("{}: invalid configuration", file.display()))?;
            println!("{}: valid", file.display());
            return Ok(());
        }
        None => {}
    }
    // Logs go to standard error; standard output is left to the program's
    // answers (`plugin check`, `config check`).
    let logs = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("imhost=info")),
        );
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }

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

async fn plugin_command(action: &PluginCommand) -> anyhow::Result<()> {
    use imhost::plugins::compile::{ArtifactCache, compile_into_cache};
    let open_cache = |dir: &Option<PathBuf>| -> anyhow::Result<ArtifactCache> {
        let dir = dir
            .clone()
            .or_else(imhost::config::default_plugin_cache)
            .context("no cache directory: pass --cache-dir (there is no XDG_CACHE_HOME or HOME)")?;
        ArtifactCache::open(&dir)
            .with_context(|| format!("cannot open the cache {}", dir.display()))
    };
    match action {
        PluginCommand::Check {
            file,
            tier,
            cache_dir,
        } => {
            let cache = match cache_dir {
                Some(_) => Some(open_cache(cache_dir)?),
                None => None,
            };
            match imhost::plugins::check_file(file, *tier, cache.as_ref()).await {
                Ok(info) => {
                    println!("{}", serde_json::to_string_pretty(&info)?);
                    Ok(())
                }
                Err(err) => refused(file, &err),
            }
        }
        PluginCommand::Compile {
            file,
            tier,
            cache_dir,
            output,
        } => {
            let wasm = if file.as_os_str() == "-" {
                let mut wasm = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut wasm)?;
                wasm
            } else {
                std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?
            };
            if let Some(output) = output {
                anyhow::ensure!(output == "-", "--output takes `-` (standard output)");
                // `--output -` is the node's own child: background work,
                // except the baseline tier, which a swap waits for.
                if *tier == imhost::plugins::engine::Tier::Optimized {
                    imhost::plugins::compile::lower_priority();
                }
                return match imhost::plugins::compile::compile_to_bytes(&wasm, *tier) {
                    Ok(artifact) => {
                        std::io::Write::write_all(&mut std::io::stdout().lock(), &artifact)?;
                        Ok(())
                    }
                    Err(err) => refused(file, &err),
                };
            }
            let cache = open_cache(cache_dir)?;
            match compile_into_cache(&cache, &wasm, *tier) {
                Ok((hash, hooks)) => {
                    let answer = serde_json::json!({"hash": hash, "tier": tier, "hooks": hooks,
                        "artifact": cache.path(&hash, *tier)});
                    println!("{answer}");
                    Ok(())
                }
                Err(err) => refused(file, &err),
            }
        }
    }
}

/// Says why a file was refused, last on standard error, and exits 1.
fn refused(file: &std::path::Path, err: &dyn std::fmt::Display) -> ! {
    eprintln!("{}: refused", file.display());
    eprintln!("refused: {err}");
    std::process::exit(1);
}
