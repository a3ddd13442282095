//! Builds the XDP object from the current lb-ebpf/lb-common sources and embeds its path, so
//! the agent can never carry a stale data plane.

fn main() {
    for path in lb_ebpf_build::ebpf_source_dirs() {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    println!("cargo:rerun-if-env-changed=LB_EBPF_CARGO");
    println!("cargo:rerun-if-env-changed=LB_EBPF_RUSTC");
    match lb_ebpf_build::build(&lb_ebpf_build::BuildOptions::default()) {
        Ok(object) => println!("cargo:rustc-env=LB_EBPF_OBJECT={}", object.display()),
        Err(e) => {
            // Cargo shows this text; make it the first thing a newcomer reads.
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
