//! Running programs of the real object with BPF_PROG_TEST_RUN, for the table-driven tests
//! (`xdp_prog`, `pod_dsr`): one frame in, the verdict and the frame out, compared byte for byte.
// Each test binary uses a part of it.
#![allow(dead_code)]

use aya::{
    Ebpf, EbpfLoader,
    programs::{ProgramError, SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use lb_agent::{EBPF_OBJECT, dataplane::Dataplane};
use lb_common::{Reason, maps};
use lb_testkit::packet::hexdump;

/// Room for the output to grow (encapsulation, ICMP errors).
const OUTPUT_SLACK: usize = 256;

/// The real object with small Maglev and `lb_xdp` loaded (the verifier accepts it); needs
/// root.
pub fn load_lb() -> Ebpf {
    require_root();
    let mut ebpf = EbpfLoader::new()
        .map_max_entries(maps::MAGLEV, 1 << 16)
        // Small flow tables: quick to create, and buckets that tests can fill.
        .map_max_entries(maps::FLOWTAB4, 1024)
        .map_max_entries(maps::FLOWTAB6, 256)
        .load(EBPF_OBJECT)
        .expect("load object");
    let prog: &mut Xdp = ebpf.program_mut(maps::PROG_LB).unwrap().try_into().unwrap();
    prog.load().expect("verifier accepts lb_xdp");
    ebpf
}

/// Fails with a clear message unless root: these tests load BPF programs.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "BPF_PROG_TEST_RUN tests load BPF programs: run them as root (cargo xtask test does)"
    );
}

fn run_opts(
    input: &[u8],
    run: impl FnOnce(TestRunOptions<'_>) -> Result<aya::programs::TestRunResult, ProgramError>,
) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; input.len() + OUTPUT_SLACK];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(input);
    opts.data_out = Some(&mut out);
    let result = run(opts).expect("BPF_PROG_TEST_RUN");
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}

/// One run of the (loaded) XDP program `name`: its verdict and output frame.
pub fn run_xdp(ebpf: &mut Ebpf, name: &str, input: &[u8]) -> (u32, Vec<u8>) {
    let prog: &mut Xdp = ebpf.program_mut(name).unwrap().try_into().unwrap();
    run_opts(input, |opts| prog.test_run(opts))
}

/// One run of the (loaded) TC program `name`: its verdict and output frame.
pub fn run_tc(ebpf: &mut Ebpf, name: &str, input: &[u8]) -> (u32, Vec<u8>) {
    let prog: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
    run_opts(input, |opts| prog.test_run(opts))
}

/// Packets counted under `r` so far (all CPUs).
pub fn reason_count(dataplane: &Dataplane, r: Reason) -> u64 {
    let stats = dataplane.stats([], []).unwrap();
    stats
        .reasons
        .iter()
        .find(|(x, _)| *x == r)
        .map_or(0, |(_, c)| c.packets)
}

/// The verdict is `action` and the frame exactly `bytes` (hex dumps of both otherwise).
pub fn assert_frame(
    name: &str,
    got: impl std::borrow::Borrow<(u32, Vec<u8>)>,
    action: u32,
    bytes: &[u8],
) {
    let got = got.borrow();
    assert_eq!(got.0, action, "{name}: action");
    assert!(
        got.1 == bytes,
        "{name}: output differs\n got:\n{}\n expected:\n{}",
        hexdump(&got.1),
        hexdump(bytes)
    );
}
