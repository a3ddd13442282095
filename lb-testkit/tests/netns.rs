//! Namespace and child-process guard tests (need root).

use std::process::Stdio;
use std::time::{Duration, Instant};

use lb_testkit::{ChildGuard, NetNs, list_netns, require_root};

fn root() {
    require_root().expect("netns tests need root");
}

#[test]
fn namespace_lifecycle_and_ways_in() {
    root();
    let ns = NetNs::new("lbtt").unwrap();
    let name = ns.name().to_owned();
    assert!(list_netns().unwrap().contains(&name));
    assert_eq!(ns.path(), std::path::Path::new("/run/netns").join(&name));

    // Only lo exists inside, whichever way we get in.
    let links = ns.exec(&["ip", "-o", "link"]).unwrap();
    assert_eq!(links.lines().count(), 1, "{links}");
    assert!(links.contains("lo:") && links.contains("UP"), "{links}");

    let out = ns.command("ip").args(["-o", "link"]).output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);

    let inside = ns
        .enter(|| std::fs::read_link("/proc/thread-self/ns/net").unwrap())
        .unwrap();
    let outside = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
    assert_ne!(inside, outside);

    let handle = ns
        .spawn_thread("probe", || {
            std::fs::read_link("/proc/thread-self/ns/net").unwrap()
        })
        .unwrap();
    assert_eq!(handle.join().unwrap(), inside);

    // A failing command reports its stderr.
    let err = ns.exec(&["ip", "link", "show", "nosuchdev"]).unwrap_err();
    assert!(format!("{err:#}").contains("nosuchdev"), "{err:#}");

    drop(ns);
    assert!(!list_netns().unwrap().contains(&name));
}

#[test]
fn command_keeps_host_mounts() {
    root();
    let ns = NetNs::new("lbtt").unwrap();
    // `ip netns exec` gives the child a fresh /sys; `command` must not.
    let host_mnt = std::fs::read_link("/proc/self/ns/mnt").unwrap();
    let out = ns
        .command("readlink")
        .arg("/proc/self/ns/mnt")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        host_mnt.to_string_lossy()
    );
}

#[test]
fn panic_inside_enter_propagates_and_cleans_up() {
    root();
    let mut name = String::new();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let ns = NetNs::new("lbtt").unwrap();
        name = ns.name().to_owned();
        ns.enter(|| panic!("boom")).unwrap();
    }));
    assert!(result.is_err());
    assert!(!name.is_empty());
    assert!(!list_netns().unwrap().contains(&name));
}

#[test]
fn child_guard_terminates() {
    root();
    let ns = NetNs::new("lbtt").unwrap();
    let guard = ChildGuard::spawn(
        ns.command("sleep")
            .arg("30")
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .unwrap();
    let pid = guard.id();
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    let start = Instant::now();
    drop(guard);
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "SIGTERM should suffice"
    );
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());

    // A child that ignores SIGTERM gets SIGKILL after the grace period. It says when its
    // trap is set (a fixed sleep lost that race on a loaded machine).
    let ready = std::env::temp_dir().join(format!("lbt-trap-ready-{}", std::process::id()));
    let _ = std::fs::remove_file(&ready);
    let script = format!(
        "trap '' TERM; touch {}; sleep 30 & wait; sleep 30",
        ready.display()
    );
    let guard =
        ChildGuard::spawn(ns.command("sh").args(["-c", &script]).stdout(Stdio::null())).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ready.exists() {
        assert!(Instant::now() < deadline, "the child never set its trap");
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = std::fs::remove_file(&ready);
    let start = Instant::now();
    let status = guard.stop().unwrap();
    assert!(!status.success());
    assert!(start.elapsed() >= Duration::from_secs(3));
    assert!(start.elapsed() < Duration::from_secs(6));
}
