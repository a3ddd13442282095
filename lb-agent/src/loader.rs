//! Loading the object, pinning maps under the pin directory, and attaching through a pinned
//! bpf_link so a later agent can replace the program atomically.

use std::{
    io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::ProgramArray,
    programs::{
        SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLink,
        xdp::XdpLink,
    },
};
use lb_common::{
    FlowKey, FlowKeyV4, FlowValue,
    flowtab::{Secret, buckets_for},
    maps,
};

use crate::{clock, flowtab};

/// The XDP object, built from this checkout's lb-ebpf sources by the build script.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("LB_EBPF_OBJECT"));

pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/lb";
const BPF_FS_MAGIC: u64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("cannot mount bpffs on {path}: {source}")]
    Mount { path: PathBuf, source: nix::Error },
    #[error("loading the eBPF object{hint}: {0}", hint = needs(.0, CREATE_MAPS))]
    Load(#[from] aya::EbpfError),
    #[error("program {name}{hint}: {source}", hint = needs(.source, LOAD_PROGRAM))]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("program {0} is missing from the object")]
    MissingProgram(&'static str),
    #[error("pinned link {path}: {source}")]
    Link {
        path: PathBuf,
        source: aya::programs::links::LinkError,
    },
    #[error("pinning link at {path}: {source}")]
    PinLink {
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        source: aya::maps::MapError,
    },
    #[error("opening the previous version's flow table {path}: {source}")]
    LegacyFlows {
        path: PathBuf,
        source: aya::maps::MapError,
    },
    #[error("moving the previous version's flows: {0}")]
    Migrate(String),
    #[error("map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error(transparent)]
    Secret(#[from] crate::flowtab::SecretError),
    #[error("measuring the kernel's tick rate: {0}")]
    Clock(#[from] crate::clock::ClockError),
    #[error("attaching {name} to {iface} egress: {source}")]
    AttachTc {
        name: &'static str,
        iface: String,
        source: aya::programs::ProgramError,
    },
    #[error("attaching to {iface} in {mode:?} mode{hint}: {source}", hint = needs(.source, ATTACH))]
    Attach {
        iface: String,
        mode: XdpMode,
        source: aya::programs::ProgramError,
    },
}

/// What each step needs when the kernel refuses it: `(on EPERM, on EACCES)`. A program load
/// is refused with EPERM without CAP_BPF or CAP_NET_ADMIN (XDP is a networking program type),
/// and the verifier rejects it with EACCES without CAP_PERFMON (pointer arithmetic on packets).
const CREATE_MAPS: (&str, &str) = (
    "creating BPF maps needs CAP_BPF",
    "creating BPF maps needs CAP_BPF",
);
const LOAD_PROGRAM: (&str, &str) = (
    "loading an XDP program needs CAP_BPF and CAP_NET_ADMIN",
    "without CAP_PERFMON the verifier rejects pointer arithmetic on packets",
);
const ATTACH: (&str, &str) = (
    "attaching an XDP program needs CAP_NET_ADMIN",
    "attaching an XDP program needs CAP_NET_ADMIN",
);

/// `" (denied: <what>)"` when the error (or one of its causes) is EPERM or EACCES, else nothing.
fn needs(err: &(dyn std::error::Error + 'static), (eperm, eacces): (&str, &str)) -> String {
    let mut cur = Some(err);
    while let Some(e) = cur {
        match e
            .downcast_ref::<io::Error>()
            .and_then(io::Error::raw_os_error)
        {
            Some(nix::libc::EPERM) => return format!(" (denied: {eperm})"),
            Some(nix::libc::EACCES) => return format!(" (denied: {eacces})"),
            _ => cur = e.source(),
        }
    }
    String::new()
}

/// XDP attach mode as the CLI spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    /// Native (driver) mode if the driver supports it, generic otherwise.
    Auto,
    Native,
    Skb,
}

/// Make sure a bpf filesystem is mounted at /sys/fs/bpf (or wherever `dir` lives), then create
/// `dir`.
pub fn ensure_pin_dir(dir: &Path) -> Result<(), LoadError> {
    let bpffs = Path::new("/sys/fs/bpf");
    if dir.starts_with(bpffs) {
        let mounted = nix::sys::statfs::statfs(bpffs)
            .map(|s| s.filesystem_type().0 as u64 == BPF_FS_MAGIC)
            .unwrap_or(false);
        if !mounted {
            tracing::info!(path = %bpffs.display(), "mounting bpffs");
            nix::mount::mount(
                Some("bpf"),
                bpffs,
                Some("bpf"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .map_err(|source| LoadError::Mount {
                path: bpffs.into(),
                source,
            })?;
        }
    }
    std::fs::create_dir_all(dir).map_err(|source| LoadError::Io {
        path: dir.into(),
        source,
    })
}

/// The key and value size of every pinned map (from the shared types), and its number of
/// entries where that is fixed by the build (`None`: set when the map is created).
fn layouts() -> [(&'static str, usize, usize, Option<u32>); 22] {
    use std::mem::size_of;

    use lb_common::{
        AffinityKey, BackendValue, Counters, DecapAddr, DnatKey, DnatValue, FloodWindow,
        FlowBucket4, FlowBucket6, FlowKey, FlowValue, FragKey, NodeConfig, Reason, RevNatValue,
        ServiceCounters, ServiceKey, ServiceRecord, ServiceValue, SourceRange, VipKey, VipValue,
    };
    let u32s = size_of::<u32>();
    [
        (
            maps::SERVICES,
            size_of::<ServiceKey>(),
            size_of::<ServiceValue>(),
            Some(maps::MAX_SERVICES),
        ),
        (
            maps::BACKENDS,
            u32s,
            size_of::<BackendValue>(),
            Some(maps::MAX_BACKENDS),
        ),
        (maps::MAGLEV, u32s, u32s, None),
        (maps::CONFIG, u32s, size_of::<NodeConfig>(), Some(1)),
        (
            maps::SERVICE_STATS,
            u32s,
            size_of::<ServiceCounters>(),
            Some(maps::MAX_SERVICES),
        ),
        (
            maps::BACKEND_STATS,
            u32s,
            size_of::<Counters>(),
            Some(maps::MAX_BACKENDS),
        ),
        (
            maps::REASON_STATS,
            u32s,
            size_of::<Counters>(),
            Some(Reason::COUNT),
        ),
        (maps::FLOWTAB4, u32s, size_of::<FlowBucket4>(), None),
        (maps::FLOWTAB6, u32s, size_of::<FlowBucket6>(), None),
        (maps::FLOOD, u32s, size_of::<FloodWindow>(), Some(1)),
        (
            maps::VIPS,
            size_of::<VipKey>(),
            size_of::<VipValue>(),
            Some(maps::MAX_SERVICES),
        ),
        (
            maps::SRC_RANGES,
            u32s + size_of::<SourceRange>(),
            u32s,
            Some(maps::MAX_SRC_RANGES),
        ),
        (
            maps::AFFINITY,
            size_of::<AffinityKey>(),
            size_of::<FlowValue>(),
            Some(maps::MAX_AFFINITY),
        ),
        (
            maps::DNAT,
            size_of::<DnatKey>(),
            size_of::<DnatValue>(),
            Some(maps::MAX_BACKENDS),
        ),
        (
            maps::REVNAT,
            size_of::<FlowKey>(),
            size_of::<RevNatValue>(),
            Some(maps::MAX_REVNAT),
        ),
        (maps::PROGS, u32s, u32s, Some(1)),
        (maps::SVC_SLOTS, u32s, u32s, Some(maps::SVC_SLOT_COUNT)),
        (
            maps::SVC_RECORDS,
            u32s,
            size_of::<ServiceRecord>(),
            Some(2 * maps::MAX_SERVICES),
        ),
        (maps::L2_LEASE, u32s, size_of::<u64>(), Some(1)),
        (
            maps::DECAP_SRC,
            u32s + size_of::<DecapAddr>(),
            u32s,
            Some(maps::MAX_DECAP_ADDRS),
        ),
        (
            maps::DECAP_DST,
            u32s + size_of::<DecapAddr>(),
            u32s,
            Some(maps::MAX_DECAP_ADDRS),
        ),
        (
            maps::REVNAT_FRAG,
            size_of::<FragKey>(),
            size_of::<RevNatValue>(),
            Some(maps::MAX_REVNAT_FRAGS),
        ),
    ]
}

/// Remove the pins of maps a build with another layout left (a field added to a value, a
/// counter array grown), so this build creates them anew: the first sync fills them from the
/// desired state, and the program still attached keeps its own copies until it is replaced,
/// so forwarding goes on. Reusing such a pin would make the new program fail to load. Pins of
/// maps this build no longer has (`maps::RETIRED`) are removed too. Returns the names of the
/// maps replaced or removed.
pub fn drop_incompatible_pins(pin_dir: &Path) -> Result<Vec<&'static str>, LoadError> {
    let mut dropped = Vec::new();
    for name in maps::RETIRED {
        let path = pin_dir.join(name);
        if path.exists() {
            tracing::info!(
                map = name,
                "removing the pin of a map this version no longer uses"
            );
            std::fs::remove_file(&path).map_err(|source| LoadError::Io {
                path: path.clone(),
                source,
            })?;
            dropped.push(name);
        }
    }
    for (name, key, value, entries) in layouts() {
        let path = pin_dir.join(name);
        if !path.exists() {
            continue;
        }
        let Ok(info) = aya::maps::MapInfo::from_pin(&path) else {
            continue;
        };
        let fits = info.key_size() as usize == key
            && info.value_size() as usize == value
            && entries.is_none_or(|n| info.max_entries() == n);
        if fits {
            continue;
        }
        tracing::warn!(
            map = name,
            pinned_key = info.key_size(),
            pinned_value = info.value_size(),
            pinned_entries = info.max_entries(),
            key,
            value,
            "a pinned map has another layout than this build: replacing it (its content is rebuilt)"
        );
        std::fs::remove_file(&path).map_err(|source| LoadError::Io {
            path: path.clone(),
            source,
        })?;
        dropped.push(name);
    }
    Ok(dropped)
}

/// Load the object; every map is opened from `pin_dir` if pinned there, else created and
/// pinned. `maglev_slots` and `flows` size `LB_MAGLEV` and the flow tables (`flows`
/// entries of IPv4, [`maps::flows6_for`] of IPv6) when they are created (pinned maps keep
/// the size they were created with). Pins of another layout are replaced first
/// ([`drop_incompatible_pins`]); the flow tables of older versions are moved into the new
/// ones ([`LegacyFlows`]).
pub fn load(pin_dir: &Path, maglev_slots: u32, flows: u32) -> Result<Ebpf, LoadError> {
    ensure_pin_dir(pin_dir)?;
    drop_incompatible_pins(pin_dir)?;
    let legacy = LegacyFlows::read(pin_dir)?;
    let adopted_tables = [maps::FLOWTAB4, maps::FLOWTAB6]
        .iter()
        .any(|name| pin_dir.join(name).exists());
    let paths: Vec<(&'static str, PathBuf)> = maps::ALL
        .iter()
        .map(|name| (*name, pin_dir.join(name)))
        .collect();
    let mut loader = EbpfLoader::new();
    loader.map_max_entries(maps::MAGLEV, maglev_slots);
    loader.map_max_entries(maps::FLOWTAB4, buckets_for(flows));
    loader.map_max_entries(maps::FLOWTAB6, buckets_for(maps::flows6_for(flows)));
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader.load(EBPF_OBJECT)?;
    // The secret of the flow tables' buckets: the pinned config's, else drawn now (a new
    // node, or an older version's config, which had none: its flows move to their buckets
    // under the new secret).
    let (secret, new) = flowtab::node_secret(&mut ebpf)?;
    if new && adopted_tables {
        let moved = flowtab::rekey::<FlowKeyV4>(&mut ebpf, &secret)?
            + flowtab::rekey::<FlowKey>(&mut ebpf, &secret)?;
        tracing::info!(
            moved,
            "a new flow-table secret: the remembered flows moved to their buckets under it"
        );
    }
    legacy.migrate(&mut ebpf, &secret)?;
    Ok(ebpf)
}

/// The flows an older version remembers, in the LRU hashes it pinned (`maps::LEGACY_FLOWS`,
/// `LEGACY_FLOWS4`, `LEGACY_FLOWS6`), read before this version loads, so the connections
/// keep their backends across the upgrade.
#[derive(Debug, Default)]
pub struct LegacyFlows {
    v4: Vec<(FlowKeyV4, FlowValue)>,
    v6: Vec<(FlowKey, FlowValue)>,
    pins: Vec<PathBuf>,
}

impl LegacyFlows {
    /// Read the older tables pinned in `pin_dir`, if any.
    pub fn read(pin_dir: &Path) -> Result<Self, LoadError> {
        use aya::maps::{HashMap, Map, MapData};

        let mut flows = LegacyFlows::default();
        for name in [maps::LEGACY_FLOWS, maps::LEGACY_FLOWS4, maps::LEGACY_FLOWS6] {
            let path = pin_dir.join(name);
            if !path.exists() {
                continue;
            }
            let opened = |path: &Path| {
                MapData::from_pin(path).map_err(|source| LoadError::LegacyFlows {
                    path: path.to_path_buf(),
                    source,
                })
            };
            let bad = |e: aya::maps::MapError| LoadError::Migrate(format!("{name}: {e}"));
            if name == maps::LEGACY_FLOWS4 {
                let table: HashMap<_, FlowKeyV4, FlowValue> =
                    HashMap::try_from(Map::LruHashMap(opened(&path)?)).map_err(bad)?;
                flows.v4.extend(table.iter().filter_map(Result::ok));
            } else {
                let table: HashMap<_, FlowKey, FlowValue> =
                    HashMap::try_from(Map::LruHashMap(opened(&path)?)).map_err(bad)?;
                for (key, value) in table.iter().filter_map(Result::ok) {
                    match key.narrow() {
                        Some(k4) => flows.v4.push((k4, value)),
                        None => flows.v6.push((key, value)),
                    }
                }
            }
            flows.pins.push(path);
        }
        Ok(flows)
    }

    /// Remember the flows in `ebpf`'s tables (best effort: a flow that cannot be written is
    /// logged and left) under the node's `secret`, then remove the old pins. Returns how many
    /// flows moved.
    pub fn migrate(self, ebpf: &mut Ebpf, secret: &Secret) -> Result<usize, LoadError> {
        let total = self.v4.len() + self.v6.len();
        let moved = remember_all(ebpf, secret, &self.v4) + remember_all(ebpf, secret, &self.v6);
        for path in &self.pins {
            std::fs::remove_file(path).map_err(|source| LoadError::Io {
                path: path.clone(),
                source,
            })?;
        }
        if !self.pins.is_empty() {
            tracing::info!(
                moved,
                of = total,
                "flows of the previous version's tables moved into LB_FLOWTAB4/LB_FLOWTAB6"
            );
        }
        Ok(moved)
    }
}

/// Remember `flows` in their table; returns how many were written.
fn remember_all<K>(ebpf: &mut Ebpf, secret: &Secret, flows: &[(K, FlowValue)]) -> usize
where
    K: lb_common::flowtab::TableKey + std::fmt::Debug,
    K::Bucket: aya::Pod,
{
    // Each is placed as if now were its own last packet: in an empty table every flow finds
    // a free way; in a full bucket the longest idle lose.
    flows
        .iter()
        .filter(|(key, value)| {
            flowtab::remember(ebpf, secret, key, value.state(), value.last_seen as u32)
                .inspect_err(|e| tracing::warn!(?key, error = %e, "flow not migrated"))
                .is_ok()
        })
        .count()
}

/// What the node config tells the data plane about itself as loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loaded {
    /// The kernel's tick rate ([`clock::kernel_hz`]).
    pub hz: u16,
    /// Buckets of the flow tables ([`flowtab::buckets`]).
    pub flow_buckets4: u32,
    pub flow_buckets6: u32,
}

/// [`Loaded`] of `ebpf`. Blocks for the HZ measurement the first time in a process.
pub fn loaded(ebpf: &mut Ebpf) -> Result<Loaded, LoadError> {
    Ok(Loaded {
        hz: clock::kernel_hz(ebpf)?,
        flow_buckets4: flowtab::buckets::<FlowKeyV4>(ebpf)?,
        flow_buckets6: flowtab::buckets::<FlowKey>(ebpf)?,
    })
}

/// Path of the pinned link for an interface.
pub fn link_pin_path(pin_dir: &Path, iface: &str) -> PathBuf {
    pin_dir.join(format!("link-{iface}"))
}

/// Path of the pinned egress (TC) link of an interface.
pub fn revnat_pin_path(pin_dir: &Path, iface: &str) -> PathBuf {
    pin_dir.join(format!("revnat-{iface}"))
}

/// Load `lb_decap` and put it in `LB_PROGS`, where `lb_xdp` tail-calls it for tunnel
/// packets to this node's endpoints and for its own local backends. The pinned program
/// array keeps it there after the agent exits (`--keep-attached`, rolling updates).
pub fn install_decap(ebpf: &mut Ebpf) -> Result<(), LoadError> {
    program(ebpf, maps::PROG_DECAP)?;
    let fd = ebpf
        .program(maps::PROG_DECAP)
        .ok_or(LoadError::MissingProgram(maps::PROG_DECAP))?
        .fd()
        .map_err(|source| LoadError::Program {
            name: maps::PROG_DECAP,
            source,
        })?
        .try_clone()
        .map_err(|source| LoadError::Io {
            path: PathBuf::from(maps::PROG_DECAP),
            source,
        })?;
    let map = ebpf.map_mut(maps::PROGS).ok_or(LoadError::Map {
        map: maps::PROGS,
        source: aya::maps::MapError::InvalidName {
            name: maps::PROGS.into(),
        },
    })?;
    let mut progs: ProgramArray<_> =
        ProgramArray::try_from(map).map_err(|source| LoadError::Map {
            map: maps::PROGS,
            source,
        })?;
    progs
        .set(maps::PROGS_DECAP, &fd, 0)
        .map_err(|source| LoadError::Map {
            map: maps::PROGS,
            source,
        })
}

/// Attach `lb_revnat` to the egress of `iface` through a pinned TCX link; an existing
/// pinned link (an earlier agent's) gets the new program atomically.
pub fn attach_revnat(
    ebpf: &mut Ebpf,
    pin_dir: &Path,
    iface: &str,
) -> Result<Attachment, LoadError> {
    let name = maps::PROG_REVNAT;
    let prog: &mut SchedClassifier = ebpf
        .program_mut(name)
        .ok_or(LoadError::MissingProgram(name))?
        .try_into()
        .map_err(|source| LoadError::Program { name, source })?;
    prog.load()
        .map_err(|source| LoadError::Program { name, source })?;
    let pin = revnat_pin_path(pin_dir, iface);
    let link_err = |pin: &Path| {
        let path = pin.to_path_buf();
        move |source| LoadError::Link { path, source }
    };
    let adopted = pin.exists();
    let id = if adopted {
        let pinned = PinnedLink::from_pin(&pin).map_err(link_err(&pin))?;
        let link = SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(link_err(&pin))?;
        prog.attach_to_link(link)
            .map_err(|source| LoadError::Program { name, source })?
    } else {
        prog.attach(iface, TcAttachType::Egress)
            .map_err(|source| LoadError::AttachTc {
                name,
                iface: iface.into(),
                source,
            })?
    };
    let link = prog
        .take_link(id)
        .map_err(|source| LoadError::Program { name, source })?;
    let link = FdLink::try_from(link).map_err(link_err(&pin))?;
    pinned_attachment(link, pin, adopted)
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, LoadError> {
    let prog: &mut Xdp = ebpf
        .program_mut(name)
        .ok_or(LoadError::MissingProgram(name))?
        .try_into()
        .map_err(|source| LoadError::Program { name, source })?;
    prog.load()
        .map_err(|source| LoadError::Program { name, source })?;
    Ok(prog)
}

/// The load balancer attached to an interface through a pinned link.
pub struct Attachment {
    pub link: FdLink,
    pub pin: PathBuf,
    /// True when an existing link was adopted (program replaced in place).
    pub adopted: bool,
}

impl Attachment {
    /// Detach: remove the pin and close the link.
    pub fn detach(self) -> Result<(), LoadError> {
        std::fs::remove_file(&self.pin).map_err(|source| LoadError::Io {
            path: self.pin.clone(),
            source,
        })?;
        drop(self.link);
        Ok(())
    }
}

/// Attach `lb_xdp` to `iface`. If a pinned link from an earlier agent exists, the program
/// behind it is replaced atomically (`BPF_LINK_UPDATE`): no packet sees a gap.
pub fn attach_lb(
    ebpf: &mut Ebpf,
    pin_dir: &Path,
    iface: &str,
    mode: AttachMode,
) -> Result<Attachment, LoadError> {
    let prog = program(ebpf, maps::PROG_LB)?;
    let pin = link_pin_path(pin_dir, iface);
    if pin.exists() {
        let pinned = PinnedLink::from_pin(&pin).map_err(|source| LoadError::Link {
            path: pin.clone(),
            source,
        })?;
        let fd_link: FdLink = pinned.into();
        let xdp_link = XdpLink::try_from(fd_link).map_err(|source| LoadError::Link {
            path: pin.clone(),
            source,
        })?;
        let id = prog
            .attach_to_link(xdp_link)
            .map_err(|source| LoadError::Program {
                name: maps::PROG_LB,
                source,
            })?;
        let link = take_fd_link(prog, id, &pin)?;
        return pinned_attachment(link, pin, true);
    }
    let id = attach_with_mode(prog, iface, mode)?;
    let link = take_fd_link(prog, id, &pin)?;
    pinned_attachment(link, pin, false)
}

/// The attachment of `link`: an adopted link is pinned already, a new one gets its pin.
fn pinned_attachment(link: FdLink, pin: PathBuf, adopted: bool) -> Result<Attachment, LoadError> {
    if adopted {
        return Ok(Attachment { link, pin, adopted });
    }
    let pinned = link.pin(&pin).map_err(|source| LoadError::PinLink {
        path: pin.clone(),
        source,
    })?;
    Ok(Attachment {
        link: pinned.into(),
        pin,
        adopted,
    })
}

fn take_fd_link(
    prog: &mut Xdp,
    id: aya::programs::xdp::XdpLinkId,
    pin: &Path,
) -> Result<FdLink, LoadError> {
    let link = prog.take_link(id).map_err(|source| LoadError::Program {
        name: maps::PROG_LB,
        source,
    })?;
    FdLink::try_from(link).map_err(|source| LoadError::Link {
        path: pin.to_path_buf(),
        source,
    })
}

fn attach_with_mode(
    prog: &mut Xdp,
    iface: &str,
    mode: AttachMode,
) -> Result<aya::programs::xdp::XdpLinkId, LoadError> {
    let attempt = |prog: &mut Xdp, m: XdpMode| {
        prog.attach(iface, m).map_err(|source| LoadError::Attach {
            iface: iface.into(),
            mode: m,
            source,
        })
    };
    match mode {
        AttachMode::Native => attempt(prog, XdpMode::Driver),
        AttachMode::Skb => attempt(prog, XdpMode::Skb),
        AttachMode::Auto => attempt(prog, XdpMode::Driver).or_else(|e| {
            tracing::info!(iface, error = %e, "native XDP unavailable, using generic (skb) mode");
            attempt(prog, XdpMode::Skb)
        }),
    }
}

/// Attach the decap program (not pinned: it lives as long as the returned link).
pub fn attach_decap(ebpf: &mut Ebpf, iface: &str, mode: AttachMode) -> Result<FdLink, LoadError> {
    let prog = program(ebpf, maps::PROG_DECAP)?;
    let id = attach_with_mode(prog, iface, mode)?;
    let link = prog.take_link(id).map_err(|source| LoadError::Program {
        name: maps::PROG_DECAP,
        source,
    })?;
    FdLink::try_from(link).map_err(|source| LoadError::Link {
        path: PathBuf::from(iface),
        source,
    })
}

/// Remove pinned links (all, or one interface's), detaching the program. Maps stay pinned
/// unless `purge`.
pub fn detach(pin_dir: &Path, iface: Option<&str>, purge: bool) -> Result<Vec<PathBuf>, LoadError> {
    let mut removed = Vec::new();
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| LoadError::Io { path, source }
    };
    let entries = match std::fs::read_dir(pin_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(io(pin_dir)(e)),
    };
    for entry in entries {
        let path = entry.map_err(io(pin_dir))?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        let is_link = match iface {
            Some(i) => name == format!("link-{i}") || name == format!("revnat-{i}"),
            None => name.starts_with("link-") || name.starts_with("revnat-"),
        };
        let is_map = maps::ALL.contains(&name.as_str());
        if is_link || (purge && is_map) {
            std::fs::remove_file(&path).map_err(io(&path))?;
            removed.push(path);
        }
    }
    if purge && iface.is_none() {
        // Succeeds only when nothing else is left in the directory.
        let _ = std::fs::remove_dir(pin_dir);
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_step_names_the_capability_it_needs() {
        let eperm = io::Error::from_raw_os_error(nix::libc::EPERM);
        let eacces = io::Error::from_raw_os_error(nix::libc::EACCES);
        let enoent = io::Error::from_raw_os_error(nix::libc::ENOENT);
        assert_eq!(
            needs(&eperm, CREATE_MAPS),
            " (denied: creating BPF maps needs CAP_BPF)"
        );
        assert!(needs(&eperm, LOAD_PROGRAM).contains("CAP_NET_ADMIN"));
        assert!(needs(&eacces, LOAD_PROGRAM).contains("CAP_PERFMON"));
        assert_eq!(needs(&enoent, ATTACH), "");
        // Found below other errors too.
        let map = aya::maps::MapError::CreateError {
            name: "LB_DNAT".into(),
            io_error: eperm,
        };
        assert!(needs(&map, CREATE_MAPS).contains("CAP_BPF"));
    }
}
