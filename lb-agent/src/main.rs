use anyhow::Context;
use clap::Parser;
use lb_agent::{
    cli::{Cli, Command},
    daemon, loader, status, trace,
};
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("info,netlink_packet_route=error")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => runtime()?
            .block_on(daemon::run(args))
            .context("lb-agent run"),
        Command::Decap(args) => runtime()?
            .block_on(daemon::decap(args))
            .context("lb-agent decap"),
        Command::Detach(args) => {
            let removed = loader::detach(&args.pin_path, args.interface.as_deref(), args.purge)
                .context("lb-agent detach")?;
            if removed.is_empty() {
                println!("nothing to detach under {}", args.pin_path.display());
            }
            for path in removed {
                println!("removed {}", path.display());
            }
            Ok(())
        }
        Command::Status(args) => status::print(&args).context("lb-agent status"),
        Command::Trace(args) => trace::print(&args).context("lb-agent trace"),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}
