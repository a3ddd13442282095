//! The two objects of the data-plane bench and timed BPF_PROG_TEST_RUN calls.
//!
//! The real object is loaded the way the agent loads it (`loader::load`, maps pinned under a
//! private directory that is removed again); the harness object (`lb-bench-harness`, built
//! next to it) brings the restoring harness and the baseline programs.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail, ensure};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData, ProgramArray},
    programs::{TestRun, TestRunOptions, Xdp},
};
use lb_agent::{dataplane::Dataplane, loader};
use lb_common::{
    bench::{self, FRAME_MAX, HarnessFrame},
    maps,
};

use super::system::thread_cpu_time;

/// The programs a measurement can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prog {
    /// `lb_xdp` from the real object.
    Lb,
    Drop,
    Pass,
    MacSwap,
}

impl Prog {
    fn name(self) -> &'static str {
        match self {
            Prog::Lb => maps::PROG_LB,
            Prog::Drop => bench::PROG_DROP,
            Prog::Pass => bench::PROG_PASS,
            Prog::MacSwap => bench::PROG_MACSWAP,
        }
    }
}

/// One BPF_PROG_TEST_RUN call.
#[derive(Clone, Debug)]
pub struct Run {
    /// Action of the last iteration.
    pub action: u32,
    /// Frame after the last iteration.
    pub output: Vec<u8>,
    /// CPU time of the calling thread over the call, per iteration (ns).
    pub cpu_ns: f64,
    /// The kernel's own per-iteration time (whole ns).
    pub kernel_ns: u32,
}

/// Removes the private pin directory (maps and all) when dropped.
pub struct PinDir(PathBuf);

impl PinDir {
    pub fn new(tag: &str) -> PinDir {
        PinDir(PathBuf::from(format!(
            "/sys/fs/bpf/lb-bench-{tag}-{}",
            std::process::id()
        )))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Err(e) = loader::detach(&self.0, None, true) {
            eprintln!("bench: removing {}: {e}", self.0.display());
        }
    }
}

/// The real object, the harness object, and the harness's maps.
pub struct Objects {
    /// Tick rate and flow-table sizes, for the node config.
    pub loaded: loader::Loaded,
    lb: Ebpf,
    harness: Ebpf,
    frame: Array<MapData, HarnessFrame>,
    progs: ProgramArray<MapData>,
    /// What the harness tail-calls now.
    slot: Option<Prog>,
    // Declared last: the maps are unpinned after every handle above is closed.
    _pins: PinDir,
}

fn load_xdp(ebpf: &mut Ebpf, name: &'static str) -> anyhow::Result<()> {
    let prog: &mut Xdp = ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} missing from its object"))?
        .try_into()
        .with_context(|| format!("{name} is not an XDP program"))?;
    prog.load()
        .with_context(|| format!("the verifier rejected {name}"))?;
    Ok(())
}

impl Objects {
    /// Load both objects; returns the handles of the real object's maps alongside.
    pub fn load(harness_object: &Path, maglev_slots: u32) -> anyhow::Result<(Objects, Dataplane)> {
        let pins = PinDir::new("dp");
        let mut lb = loader::load(pins.path(), maglev_slots, maps::DEFAULT_FLOWS)
            .context("loading the real object (lb-agent's loader)")?;
        load_xdp(&mut lb, maps::PROG_LB)?;
        let loaded = loader::loaded(&mut lb).context("reading the loaded data plane")?;
        let dataplane = Dataplane::from_ebpf(&mut lb).context("opening the real object's maps")?;

        let mut harness = EbpfLoader::new()
            .load_file(harness_object)
            .with_context(|| format!("loading {}", harness_object.display()))?;
        for name in [
            bench::PROG_HARNESS,
            bench::PROG_DROP,
            bench::PROG_PASS,
            bench::PROG_MACSWAP,
        ] {
            load_xdp(&mut harness, name)?;
        }
        let take = |ebpf: &mut Ebpf, name: &str| {
            ebpf.take_map(name)
                .with_context(|| format!("map {name} missing from the harness object"))
        };
        let frame = Array::try_from(take(&mut harness, bench::FRAME)?)
            .with_context(|| format!("map {}", bench::FRAME))?;
        let progs = ProgramArray::try_from(take(&mut harness, bench::PROGS)?)
            .with_context(|| format!("map {}", bench::PROGS))?;
        Ok((
            Objects {
                loaded,
                lb,
                harness,
                frame,
                progs,
                slot: None,
                _pins: pins,
            },
            dataplane,
        ))
    }

    fn xdp(&self, prog: Prog) -> anyhow::Result<&Xdp> {
        let ebpf = match prog {
            Prog::Lb => &self.lb,
            _ => &self.harness,
        };
        let p: &Xdp = ebpf
            .program(prog.name())
            .with_context(|| format!("program {} missing", prog.name()))?
            .try_into()?;
        Ok(p)
    }

    fn test_run(&self, prog: &Xdp, input: &[u8], repeat: u32) -> anyhow::Result<Run> {
        let mut out = vec![0u8; input.len() + 512];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(input);
        opts.data_out = Some(&mut out);
        opts.repeat = repeat;
        let start = thread_cpu_time();
        let result = prog.test_run(opts).context("BPF_PROG_TEST_RUN")?;
        let cpu = thread_cpu_time().saturating_sub(start);
        out.truncate(result.data_size_out as usize);
        Ok(Run {
            action: result.return_value,
            output: out,
            cpu_ns: cpu.as_nanos() as f64 / f64::from(repeat.max(1)),
            kernel_ns: result.duration.as_nanos() as u32,
        })
    }

    /// Run `prog` itself `repeat` times on one buffer (the kernel's plain `repeat`).
    pub fn direct(&self, prog: Prog, input: &[u8], repeat: u32) -> anyhow::Result<Run> {
        self.test_run(self.xdp(prog)?, input, repeat)
    }

    /// Run the harness `repeat` times on `input`; each iteration restores `input` and
    /// tail-calls `prog`. Fails unless the harness ran every iteration without an error.
    pub fn through_harness(
        &mut self,
        prog: Prog,
        input: &[u8],
        repeat: u32,
    ) -> anyhow::Result<Run> {
        ensure!(
            (14..=FRAME_MAX).contains(&input.len()),
            "frame of {} bytes: the harness restores 14..={FRAME_MAX}",
            input.len()
        );
        if self.slot != Some(prog) {
            let fd = self.xdp(prog)?.fd()?.try_clone()?;
            self.progs
                .set(bench::TARGET_SLOT, &fd, 0)
                .with_context(|| format!("putting {} into {}", prog.name(), bench::PROGS))?;
            self.slot = Some(prog);
        }
        let mut frame = HarnessFrame::EMPTY;
        frame.len = input.len() as u32;
        frame.bytes[..input.len()].copy_from_slice(input);
        self.frame.set(0, frame, 0)?;
        let run = self.test_run(self.xdp_harness()?, input, repeat)?;
        let after = self.frame.get(&0, 0)?;
        if after.errors != 0 || after.runs != u64::from(repeat) {
            bail!(
                "harness → {}: {} of {} iterations ran, {} could not restore the frame or tail-call",
                prog.name(),
                after.runs,
                repeat,
                after.errors
            );
        }
        Ok(run)
    }

    fn xdp_harness(&self) -> anyhow::Result<&Xdp> {
        let p: &Xdp = self
            .harness
            .program(bench::PROG_HARNESS)
            .context("harness program missing")?
            .try_into()?;
        Ok(p)
    }
}
