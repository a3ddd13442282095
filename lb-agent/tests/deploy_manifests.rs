//! The manifests under deploy/, rendered by `kubectl kustomize` exactly as `kubectl apply -k`
//! would send them: least privilege (no `privileged`, four capabilities, read-only RBAC on
//! Services), the mounts the agent needs, and a ConfigMap the agent accepts.

use std::{collections::BTreeSet, path::PathBuf, process::Command};

use lb_agent::k8s::{CONFIG_KEY, K8sConfig};
use serde::Deserialize;
use serde_json::Value;

const NAMESPACE: &str = "lb-system";

fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn render() -> Vec<Value> {
    let dir = deploy_dir();
    let out = match Command::new("kubectl").arg("kustomize").arg(&dir).output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("kubectl not found: install kubectl: apt-get install kubernetes-client")
        }
        Err(e) => panic!("cannot run kubectl: {e}"),
    };
    assert!(
        out.status.success(),
        "kubectl kustomize {} failed: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("kustomize output is UTF-8");
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).expect("kustomize output is YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the rendered manifests"))
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// Every `privileged` key anywhere below `v`, with its value.
fn privileged_values(v: &Value, out: &mut Vec<Value>) {
    match v {
        Value::Object(o) => {
            for (k, x) in o {
                if k == "privileged" {
                    out.push(x.clone());
                }
                privileged_values(x, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|x| privileged_values(x, out)),
        _ => {}
    }
}

#[test]
fn daemonset_is_unprivileged_with_exactly_the_capabilities_it_needs() {
    let docs = render();
    let ds = find(&docs, "DaemonSet", "lb-agent");
    assert_eq!(ds["metadata"]["namespace"], NAMESPACE);

    let mut privileged = Vec::new();
    privileged_values(ds, &mut privileged);
    assert!(
        privileged.iter().all(|v| *v == Value::Bool(false)),
        "privileged set in the DaemonSet: {privileged:?}"
    );

    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet");
    assert_eq!(pod["serviceAccountName"], "lb-agent");
    assert!(pod["securityContext"]["privileged"].is_null());

    let containers = pod["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1);
    assert!(pod["initContainers"].is_null());
    let c = &containers[0];
    let args = strings(&c["args"]);
    assert_eq!(
        args,
        [
            "run",
            "--kubernetes",
            "--config-map",
            "lb-agent",
            "--keep-attached",
            "--announce-file",
            "/run/xdp-lb/announce.json"
        ]
    );
    // The agent reads the ConfigMap these manifests create, in its own namespace.
    let config_map = args[args.iter().position(|a| *a == "--config-map").unwrap() + 1];
    find(&docs, "ConfigMap", config_map);
    let sc = &c["securityContext"];
    let added: BTreeSet<&str> = strings(&sc["capabilities"]["add"]).into_iter().collect();
    assert_eq!(
        added,
        BTreeSet::from(["BPF", "NET_ADMIN", "PERFMON", "SYS_RESOURCE"])
    );
    assert_eq!(strings(&sc["capabilities"]["add"]).len(), 4, "duplicates");
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);

    let node_name = c["env"]
        .as_array()
        .and_then(|env| env.iter().find(|e| e["name"] == "NODE_NAME"))
        .expect("NODE_NAME in env");
    assert_eq!(
        node_name["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    let pod_namespace = c["env"]
        .as_array()
        .and_then(|env| env.iter().find(|e| e["name"] == "POD_NAMESPACE"))
        .expect("POD_NAMESPACE in env");
    assert_eq!(
        pod_namespace["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.namespace"
    );

    // Mounts: bpffs (pins survive the pod) and BTF read-only, both from the host.
    let volumes = pod["volumes"].as_array().expect("volumes");
    let mounts = c["volumeMounts"].as_array().expect("volumeMounts");
    let mount_of = |path: &str| {
        let m = mounts
            .iter()
            .find(|m| m["mountPath"] == path)
            .unwrap_or_else(|| panic!("{path} not mounted"));
        let v = volumes
            .iter()
            .find(|v| v["name"] == m["name"])
            .unwrap_or_else(|| panic!("no volume for {path}"));
        assert_eq!(v["hostPath"]["path"], path, "{path} is not the host's");
        m
    };
    let bpffs = mount_of("/sys/fs/bpf");
    assert_ne!(bpffs["readOnly"], true, "the agent pins under /sys/fs/bpf");
    assert_ne!(
        bpffs["mountPropagation"], "Bidirectional",
        "Bidirectional needs privileged"
    );
    assert_eq!(mount_of("/sys/kernel/btf")["readOnly"], true);
    // The announcement file for the node's routing daemon lives on the host.
    assert_ne!(mount_of("/run/xdp-lb")["readOnly"], true);

    for m in mounts {
        assert_ne!(m["mountPropagation"], "Bidirectional", "{m}");
    }

    // Replace one node's agent at a time; never two on a node.
    let ru = &ds["spec"]["updateStrategy"];
    assert_eq!(ru["type"], "RollingUpdate");
    assert_eq!(ru["rollingUpdate"]["maxUnavailable"], 1);
    assert_eq!(ru["rollingUpdate"]["maxSurge"], 0);
}

#[test]
fn rbac_is_least_privilege() {
    let docs = render();
    let cr = find(&docs, "ClusterRole", "lb-agent");
    let role = find(&docs, "Role", "lb-agent");
    assert_eq!(role["metadata"]["namespace"], NAMESPACE);
    const READ: [&str; 3] = ["get", "list", "watch"];

    // What the ClusterRole grants: (group, resource) → verbs.
    let mut grants: Vec<(String, String, Vec<String>)> = Vec::new();
    for rule in cr["rules"].as_array().expect("rules") {
        assert!(
            rule["resourceNames"].is_null() && rule["nonResourceURLs"].is_null(),
            "{rule}"
        );
        for field in ["apiGroups", "resources", "verbs"] {
            assert!(
                !strings(&rule[field]).contains(&"*"),
                "ClusterRole grants `*` {field}: {rule}"
            );
        }
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                let verbs = strings(&rule["verbs"]).into_iter().map(String::from);
                grants.push((group.into(), resource.into(), verbs.collect()));
            }
        }
    }
    let verbs_on = |group: &str, resource: &str| -> BTreeSet<String> {
        grants
            .iter()
            .filter(|(g, r, _)| g == group && r == resource)
            .flat_map(|(_, _, v)| v.iter().cloned())
            .collect()
    };
    let read: BTreeSet<String> = READ.iter().map(|v| v.to_string()).collect();
    assert_eq!(verbs_on("", "services"), read);
    assert_eq!(verbs_on("", "nodes"), read);
    assert_eq!(verbs_on("discovery.k8s.io", "endpointslices"), read);
    // No status writer yet: nothing on services/status.
    assert!(verbs_on("", "services/status").is_empty());
    // The only writes: Events.
    for (group, resource, verbs) in &grants {
        let writes: Vec<&String> = verbs
            .iter()
            .filter(|v| !READ.contains(&v.as_str()))
            .collect();
        if !writes.is_empty() {
            assert_eq!(
                (resource.as_str(), group.as_str()),
                ("events", "events.k8s.io"),
                "write verbs {writes:?}"
            );
            assert!(
                writes.iter().all(|v| *v == "create" || *v == "patch"),
                "{writes:?}"
            );
        }
    }

    // The Role: read its ConfigMap, nothing else.
    let rules = role["rules"].as_array().expect("rules");
    assert_eq!(rules.len(), 1);
    assert_eq!(strings(&rules[0]["apiGroups"]), [""]);
    assert_eq!(strings(&rules[0]["resources"]), ["configmaps"]);
    assert_eq!(strings(&rules[0]["verbs"]), READ);

    // Both bound to the agent's ServiceAccount.
    find(&docs, "ServiceAccount", "lb-agent");
    for (kind, role_kind) in [
        ("ClusterRoleBinding", "ClusterRole"),
        ("RoleBinding", "Role"),
    ] {
        let b = find(&docs, kind, "lb-agent");
        assert_eq!(b["roleRef"]["kind"], role_kind);
        assert_eq!(b["roleRef"]["name"], "lb-agent");
        let s = &b["subjects"][0];
        assert_eq!(
            (&s["kind"], &s["name"], &s["namespace"]),
            (
                &Value::from("ServiceAccount"),
                &Value::from("lb-agent"),
                &Value::from(NAMESPACE)
            )
        );
    }
}

#[test]
fn namespace_and_config_map_are_valid() {
    let docs = render();
    find(&docs, "Namespace", NAMESPACE);
    for d in &docs {
        let kind = d["kind"].as_str().unwrap_or_default();
        if !matches!(kind, "Namespace" | "ClusterRole" | "ClusterRoleBinding") {
            assert_eq!(d["metadata"]["namespace"], NAMESPACE, "{kind}");
        }
    }
    let cm = find(&docs, "ConfigMap", "lb-agent");
    let text = cm["data"][CONFIG_KEY]
        .as_str()
        .unwrap_or_else(|| panic!("ConfigMap lb-agent has no {CONFIG_KEY}"));
    let cfg = K8sConfig::parse("deploy/configmap.yaml", text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        cfg,
        K8sConfig {
            interface: Some("eth0".into()),
            ..K8sConfig::default()
        }
    );
}
