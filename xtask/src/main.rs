//! Project tasks: `cargo xtask <task>`.

mod bench;
mod build_ebpf;
mod demo;
mod image;
mod setup;
mod test;
mod util;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "Project tasks for the XDP load balancer")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the eBPF toolchain and test tools (apt packages, bpf-linker). Needs root.
    Setup,
    /// Build the XDP object for bpfel-unknown-none and print its path.
    BuildEbpf(build_ebpf::Options),
    /// Run every test tier: formatting, clippy, unit, BPF_PROG_TEST_RUN, netns end to end.
    /// Needs root.
    Test(test::Options),
    /// Local demo in network namespaces: a client, a load balancer and three backends.
    /// Needs root.
    Demo(demo::Options),
    /// Benchmarks: data plane (BPF_PROG_TEST_RUN), control plane (Maglev, sync, agent RSS),
    /// end to end (pps through an LB namespace). Writes target/bench/. Needs root.
    Bench(bench::Options),
    /// The lb-agent container image without a registry: debootstrap (bookworm minbase +
    /// bird2) and buildah; tags lb-agent:VERSION in containers storage and writes an OCI
    /// archive (target/image/). Needs root.
    Image(image::Options),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup::run(),
        Task::BuildEbpf(opts) => build_ebpf::run(&opts),
        Task::Test(opts) => test::run(&opts),
        Task::Demo(opts) => demo::run(&opts),
        Task::Bench(opts) => bench::run(&opts),
        Task::Image(opts) => image::run(&opts),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
