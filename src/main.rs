//! `portunus`: the binary. Command line, configuration file to typed settings, wiring,
//! signals. Glue only: the work is done by the `portunus-*` crates.

mod admin;
mod certs;
mod config;
mod instance;
mod logging;
mod run;
mod watch;
mod workers;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// A reverse proxy that gives every site free, valid HTTPS automatically.
#[derive(Debug, Parser)]
#[command(name = "portunus", version, about, disable_version_flag = false)]
struct Cli {
    /// How operational logs look (filter them with RUST_LOG, e.g. `info,portunus_acme=debug`).
    #[arg(long, global = true, value_enum, default_value = "pretty")]
    log_format: logging::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the sites of a configuration file (without one: the embedded default).
    Run {
        /// Configuration file (default: $PORTUNUS_CONFIG, else ./portunus.toml, else the
        /// embedded default: a welcome page on http://localhost:8080).
        #[arg(short, long, env = "PORTUNUS_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Validate a configuration file without touching the network or the disk.
    Check {
        /// Configuration file (default: $PORTUNUS_CONFIG, else ./portunus.toml).
        #[arg(short, long, env = "PORTUNUS_CONFIG", default_value = "portunus.toml")]
        config: PathBuf,
    },
    /// Proxy one site without a configuration file.
    Proxy {
        /// The address to serve: `HOST`, `HOST:PORT` or `http://HOST:PORT` (port 80 if absent).
        #[arg(long)]
        from: String,
        /// The upstream: `HOST:PORT` or `http://HOST:PORT/base`.
        #[arg(long)]
        to: String,
        /// Serve HTTPS with a certificate from the local CA (port 443 if absent in --from).
        #[arg(long)]
        internal: bool,
    },
    /// Certificates: list them, or renew one now.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Print the version.
    Version,
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// Names, issuer, expiry, next renewal and last error of every certificate (from the
    /// running instance's admin API, else from the store).
    List {
        /// Configuration file (default: $PORTUNUS_CONFIG, else ./portunus.toml).
        #[arg(short, long, env = "PORTUNUS_CONFIG", default_value = "portunus.toml")]
        config: PathBuf,
    },
    /// Renew the certificate covering NAME now, through the admin API.
    Renew {
        /// Any host name the certificate covers.
        name: String,
        /// Configuration file (default: $PORTUNUS_CONFIG, else ./portunus.toml).
        #[arg(short, long, env = "PORTUNUS_CONFIG", default_value = "portunus.toml")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Version => {
            println!("portunus {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Check { config } => match config::load(&config) {
            Ok(c) => {
                println!(
                    "{}: ok ({} site{})",
                    config.display(),
                    c.sites.len(),
                    if c.sites.len() == 1 { "" } else { "s" }
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(1)
            }
        },
        Command::Run { config } => {
            let path = config.unwrap_or_else(|| PathBuf::from("portunus.toml"));
            let explicit = path != std::path::Path::new("portunus.toml") || path.exists();
            if explicit {
                finish(run::run_file(path, cli.log_format))
            } else {
                finish(run::run_embedded_default(cli.log_format))
            }
        }
        Command::Certs { command } => finish(match command {
            CertsCommand::List { config } => certs::list(&config),
            CertsCommand::Renew { name, config } => certs::renew(&config, &name),
        }),
        Command::Proxy { from, to, internal } => {
            let access = logging::AccessLog::default();
            if let Err(e) = logging::init(cli.log_format, &access) {
                return finish(Err(e));
            }
            finish(run::one_site(&from, &to, internal).and_then(|c| run::run_config(c, None)))
        }
    }
}

fn finish(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
