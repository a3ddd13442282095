fn main() {
    match lb_ebpf_build::build(&lb_ebpf_build::BuildOptions::default()) {
        Ok(p) => println!("{}", p.display()),
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1)
        }
    }
}
