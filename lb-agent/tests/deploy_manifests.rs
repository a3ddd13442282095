//! The manifests under deploy/, rendered by `kubectl kustomize` exactly as `kubectl apply -k`
//! would send them: least privilege (no `privileged`, all capabilities dropped and five added
//! back, seccomp `RuntimeDefault`, read-only root file system, RBAC that writes only
//! Service and pool status, Events and the IPAM Lease), the mounts the agent needs, a
//! ConfigMap the agent accepts, and an IPAddressPool CRD whose schema keeps every field the
//! agent reads (and the example pools, which the agent accepts).

use std::{collections::BTreeSet, fs, path::PathBuf, process::Command};

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, LabelSelectorRequirement, Time},
    jiff::Timestamp,
};
use lb_agent::{
    ipam::{
        DEFAULT_LEASE_NAME, IpAddressPool, IpAddressPoolSpec, POOL_API_VERSION, POOL_KIND,
        PoolAnnounceSpec, PoolBgpSpec, ServiceAllocationSpec, controller::pool_resource,
        reconcile::CONDITION_VALID, validate_pools,
    },
    k8s::{CONFIG_KEY, K8sConfig},
};
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
    assert_eq!(containers.len(), 2, "the agent and its BIRD sidecar");
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
            "/run/xdp-lb/announce.json",
            "--metrics-address",
            "0.0.0.0:9740"
        ]
    );
    // The probes and the scrape annotation use the port the agent serves on, and the
    // agent's own parser accepts these arguments.
    let metrics: std::net::SocketAddr = args[args.len() - 1].parse().unwrap();
    assert_eq!(c["ports"][0]["name"], "metrics");
    assert_eq!(c["ports"][0]["containerPort"], metrics.port());
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], "metrics");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], "metrics");
    assert_eq!(
        ds["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"],
        metrics.port().to_string()
    );
    {
        use clap::Parser;
        let cli = lb_agent::cli::Cli::try_parse_from(
            std::iter::once("lb-agent")
                .chain(args.iter().copied())
                .chain(["--node-name", "n"]),
        )
        .unwrap();
        let lb_agent::cli::Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert_eq!(run.metrics_address, Some(metrics));
    }
    // The agent reads the ConfigMap these manifests create, in its own namespace.
    let config_map = args[args.iter().position(|a| *a == "--config-map").unwrap() + 1];
    find(&docs, "ConfigMap", config_map);
    let sc = &c["securityContext"];
    // tests/privileges.rs runs the agent with exactly this list, read from daemonset.yaml,
    // and measures what fails without each one.
    let added: BTreeSet<&str> = strings(&sc["capabilities"]["add"]).into_iter().collect();
    assert_eq!(
        added,
        BTreeSet::from(["BPF", "NET_ADMIN", "PERFMON", "SYS_RESOURCE", "NET_RAW"])
    );
    assert_eq!(strings(&sc["capabilities"]["add"]).len(), 5, "duplicates");
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    // Capabilities are effective only for uid 0 (the test runs it as uid 0 too).
    assert_eq!(sc["runAsUser"], 0);

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

    // The BIRD sidecar: only port 179, and the agent's bird.conf from the shared directory.
    let bird = &containers[1];
    assert_eq!(bird["name"], "bird");
    assert_eq!(bird["image"], c["image"], "one image carries both");
    let bsc = &bird["securityContext"];
    assert_eq!(strings(&bsc["capabilities"]["add"]), ["NET_BIND_SERVICE"]);
    assert_eq!(strings(&bsc["capabilities"]["drop"]), ["ALL"]);
    assert_eq!(bsc["readOnlyRootFilesystem"], true);
    assert_eq!(bsc["allowPrivilegeEscalation"], false);
    assert_eq!(bsc["privileged"], false);
    assert_eq!(bsc["seccompProfile"]["type"], "RuntimeDefault");
    let script = strings(&bird["args"]).join(" ");
    assert!(
        script.contains("bird -f -c /run/xdp-lb/bird.conf -s /run/xdp-lb/bird.ctl"),
        "{script}"
    );
    assert!(
        bird["volumeMounts"]
            .as_array()
            .is_some_and(|m| m.iter().any(|m| m["mountPath"] == "/run/xdp-lb")),
        "the sidecar sees the agent's bird.conf"
    );

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
    let patch: BTreeSet<String> = BTreeSet::from(["patch".to_string()]);
    assert_eq!(verbs_on("", "services"), read);
    assert_eq!(verbs_on("", "nodes"), read);
    assert_eq!(verbs_on("discovery.k8s.io", "endpointslices"), read);
    assert_eq!(verbs_on("xdp-lb.io", "ipaddresspools"), read);
    // The IPAM controller writes status.loadBalancer.ingress and the pools' condition with
    // merge patches, nothing else of them.
    assert_eq!(verbs_on("", "services/status"), patch);
    assert_eq!(verbs_on("xdp-lb.io", "ipaddresspools/status"), patch);
    // The only writes: those two status subresources and Events.
    for (group, resource, verbs) in &grants {
        let writes: Vec<&String> = verbs
            .iter()
            .filter(|v| !READ.contains(&v.as_str()))
            .collect();
        if writes.is_empty() {
            continue;
        }
        match (group.as_str(), resource.as_str()) {
            ("events.k8s.io", "events") => assert!(
                writes.iter().all(|v| *v == "create" || *v == "patch"),
                "{writes:?}"
            ),
            ("", "services/status") | ("xdp-lb.io", "ipaddresspools/status") => {
                assert!(writes.iter().all(|v| *v == "patch"), "{writes:?}")
            }
            other => panic!("write verbs {writes:?} on {other:?}"),
        }
    }

    // The Role: read its ConfigMap; create the Lease, read and renew only that one.
    let rules = role["rules"].as_array().expect("rules");
    assert_eq!(rules.len(), 3, "{rules:#?}");
    assert_eq!(strings(&rules[0]["apiGroups"]), [""]);
    assert_eq!(strings(&rules[0]["resources"]), ["configmaps"]);
    assert_eq!(strings(&rules[0]["verbs"]), READ);
    for rule in &rules[1..] {
        assert_eq!(strings(&rule["apiGroups"]), ["coordination.k8s.io"]);
        assert_eq!(strings(&rule["resources"]), ["leases"]);
    }
    assert_eq!(strings(&rules[1]["verbs"]), ["create"]);
    assert_eq!(strings(&rules[2]["verbs"]), ["get", "update"]);
    // The Lease the agent uses (the DaemonSet does not pick another one).
    let ds = find(&docs, "DaemonSet", "lb-agent");
    let args = strings(&ds["spec"]["template"]["spec"]["containers"][0]["args"]);
    assert!(!args.iter().any(|a| a.starts_with("--ipam")), "{args:?}");
    assert_eq!(strings(&rules[2]["resourceNames"]), [DEFAULT_LEASE_NAME]);

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
        if !matches!(
            kind,
            "Namespace" | "ClusterRole" | "ClusterRoleBinding" | "CustomResourceDefinition"
        ) {
            assert_eq!(d["metadata"]["namespace"], NAMESPACE, "{kind}");
        }
    }
    let cm = find(&docs, "ConfigMap", "lb-agent");
    let text = cm["data"][CONFIG_KEY]
        .as_str()
        .unwrap_or_else(|| panic!("ConfigMap lb-agent has no {CONFIG_KEY}"));
    let cfg = K8sConfig::parse("deploy/configmap.yaml", text).unwrap_or_else(|e| panic!("{e}"));
    let mut announce = lb_agent::announce::AnnounceSpec {
        mode: lb_agent::announce::AnnounceMode::L2,
        ..Default::default()
    };
    announce.membership.port = 7473;
    assert_eq!(
        cfg,
        K8sConfig {
            node: lb_agent::state::NodeSpec {
                interface: Some("eth0".into()),
                announce,
                ..K8sConfig::default().node
            },
            ..K8sConfig::default()
        }
    );
}

#[test]
fn the_example_bgp_config_map_is_valid_and_matches_the_sidecar() {
    let path = deploy_dir().join("examples/configmap-bgp.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let cm: Value = serde_yaml_ng::from_str(&text).unwrap();
    let cfg = K8sConfig::parse(
        "examples/configmap-bgp.yaml",
        cm["data"][CONFIG_KEY].as_str().unwrap(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        cfg.node.announce.mode,
        lb_agent::announce::AnnounceMode::Bgp
    );
    let bgp = cfg.node.announce.bgp.expect("bgp settings");
    assert_eq!(
        bgp.bird.config,
        std::path::Path::new("/run/xdp-lb/bird.conf")
    );
    assert_eq!(
        bgp.bird.socket,
        std::path::Path::new("/run/xdp-lb/bird.ctl")
    );
}

/// Every key of `value` (an object as the agent would write or read it) must be kept by
/// `schema` (a structural OpenAPI schema), or the API server would prune it.
fn assert_schema_keeps(schema: &Value, value: &Value, path: &str) {
    match value {
        Value::Object(o) => {
            assert_eq!(schema["type"], "object", "{path}: {schema}");
            for (k, v) in o {
                let sub = if schema["properties"][k].is_object() {
                    &schema["properties"][k]
                } else if schema["additionalProperties"].is_object() {
                    &schema["additionalProperties"]
                } else {
                    panic!("{path}.{k} is not in the schema (it would be pruned)");
                };
                assert_schema_keeps(sub, v, &format!("{path}.{k}"));
            }
        }
        Value::Array(a) => {
            assert_eq!(schema["type"], "array", "{path}: {schema}");
            for (i, v) in a.iter().enumerate() {
                assert_schema_keeps(&schema["items"], v, &format!("{path}[{i}]"));
            }
        }
        Value::String(s) => {
            assert_eq!(schema["type"], "string", "{path}: {schema}");
            if let Some(values) = schema["enum"].as_array() {
                assert!(values.contains(value), "{path}: {s:?} not in {values:?}");
            }
        }
        Value::Bool(_) => assert_eq!(schema["type"], "boolean", "{path}"),
        Value::Number(_) => assert_eq!(schema["type"], "integer", "{path}"),
        Value::Null => {}
    }
}

#[test]
fn the_pool_crd_matches_what_the_agent_reads_and_writes() {
    let docs = render();
    let resource = pool_resource();
    let crd = find(
        &docs,
        "CustomResourceDefinition",
        &format!("{}.{}", resource.plural, resource.group),
    );
    let spec = &crd["spec"];
    assert_eq!(spec["group"], resource.group);
    assert_eq!(spec["scope"], "Cluster");
    assert_eq!(spec["names"]["kind"], POOL_KIND);
    assert_eq!(spec["names"]["plural"], resource.plural);
    let versions = spec["versions"].as_array().expect("versions");
    assert_eq!(versions.len(), 1);
    let v = &versions[0];
    assert_eq!(
        format!(
            "{}/{}",
            spec["group"].as_str().unwrap(),
            v["name"].as_str().unwrap()
        ),
        POOL_API_VERSION
    );
    assert_eq!(
        (&v["served"], &v["storage"]),
        (&Value::Bool(true), &Value::Bool(true))
    );
    assert!(
        v["subresources"]["status"].is_object(),
        "the agent patches the status subresource"
    );
    let columns: Vec<&str> = v["additionalPrinterColumns"]
        .as_array()
        .expect("printer columns")
        .iter()
        .filter_map(|c| c["jsonPath"].as_str())
        .collect();
    assert!(
        columns.contains(
            &format!(".status.conditions[?(@.type==\"{CONDITION_VALID}\")].status").as_str()
        ),
        "{columns:?}"
    );

    // A spec with every field set survives the schema.
    let schema = &v["schema"]["openAPIV3Schema"];
    let full = IpAddressPoolSpec {
        addresses: vec!["198.18.10.0/24".into()],
        ipv4: vec!["198.18.20.10-198.18.20.19".into()],
        ipv6: vec!["2001:db8:10::/120".into()],
        auto_assign: Some(false),
        avoid_buggy_ips: Some(true),
        service_allocation: Some(ServiceAllocationSpec {
            namespaces: vec!["dns".into()],
            service_selector: Some(LabelSelector {
                match_labels: Some([("exposure".to_string(), "public".to_string())].into()),
                match_expressions: Some(vec![LabelSelectorRequirement {
                    key: "tier".into(),
                    operator: "In".into(),
                    values: Some(vec!["edge".into()]),
                }]),
            }),
        }),
        announce: Some(PoolAnnounceSpec {
            node_selector: Some(LabelSelector {
                match_labels: Some([("edge".to_string(), "true".to_string())].into()),
                match_expressions: Some(vec![LabelSelectorRequirement {
                    key: "zone".into(),
                    operator: "NotIn".into(),
                    values: Some(vec!["b".into()]),
                }]),
            }),
            bgp: Some(PoolBgpSpec {
                communities: vec!["64512:100".into()],
                large_communities: vec!["64512:1:2".into()],
                local_pref: Some(200),
            }),
        }),
    };
    assert_schema_keeps(
        &schema["properties"]["spec"],
        &serde_json::to_value(&full).unwrap(),
        "spec",
    );
    // So does the condition the agent writes, with every field the schema requires.
    let condition = serde_json::to_value(Condition {
        type_: CONDITION_VALID.into(),
        status: "False".into(),
        reason: "InvalidPool".into(),
        message: "addresses: ...".into(),
        observed_generation: Some(3),
        last_transition_time: Time(Timestamp::from_second(1_700_000_000).unwrap()),
    })
    .unwrap();
    let conditions = &schema["properties"]["status"]["properties"]["conditions"];
    assert_schema_keeps(
        conditions,
        &Value::Array(vec![condition.clone()]),
        "status.conditions",
    );
    for field in strings(&conditions["items"]["required"]) {
        assert!(!condition[field].is_null(), "required {field} is written");
    }
}

#[test]
fn the_example_pools_are_valid() {
    let path = deploy_dir().join("examples/ipaddresspool.yaml");
    let text = fs::read_to_string(&path).unwrap();
    let pools: Vec<IpAddressPool> = serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| IpAddressPool::deserialize(doc).expect("an IPAddressPool"))
        .collect();
    assert_eq!(pools.len(), 2);
    for p in &pools {
        assert_eq!(
            (p.api_version.as_str(), p.kind.as_str()),
            (POOL_API_VERSION, POOL_KIND)
        );
    }
    let (valid, errors) = validate_pools(pools.iter().map(|p| (p.name(), &p.spec)));
    assert_eq!(errors, vec![]);
    assert_eq!(valid.len(), 2);
    let dns = valid.iter().find(|p| p.name == "dns").unwrap();
    assert!(dns.announce.node_selector.is_some());
    assert_eq!(
        dns.announce
            .route
            .as_ref()
            .map(|r| (r.communities.clone(), r.local_pref)),
        Some((vec![(64512, 53)], Some(200)))
    );
    let docs = render();
    let crd = find(
        &docs,
        "CustomResourceDefinition",
        "ipaddresspools.xdp-lb.io",
    );
    let spec_schema =
        &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    for p in &pools {
        assert_schema_keeps(
            spec_schema,
            &serde_json::to_value(&p.spec).unwrap(),
            p.name(),
        );
    }
}
