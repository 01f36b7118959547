//! The manifests in deploy/ read into Kubernetes' own API types, and held to
//! the binary: every flag and variable a pod passes is one `strata serve`
//! takes, every probe path is a route, every named port exists, and each
//! pod's identity resolves to its rank and to pod 0 as leader.

use std::collections::HashMap;
use std::path::PathBuf;

use clap::Parser;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Container, PodTemplateSpec, Service};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_yaml::Value;

use crate::launch::{self, LaunchFlags, Role};
use crate::{serve_flags, vllm_compat, Cli, Command, ServeArgs};

fn deploy(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy")
        .join(path)
}

/// The documents of a multi-document YAML file.
fn documents(path: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(deploy(path)).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

/// Key paths of `orig` that `round` lacks: what the typed read dropped,
/// i.e. fields the Kubernetes API does not have (k8s-openapi ignores
/// unknown fields, so a typo would otherwise pass).
fn dropped(orig: &Value, round: &Value, at: &str, out: &mut Vec<String>) {
    match (orig, round) {
        (Value::Mapping(a), Value::Mapping(b)) => {
            for (k, v) in a {
                let key = format!("{at}.{}", k.as_str().unwrap_or("?"));
                match b.get(k) {
                    Some(w) => dropped(v, w, &key, out),
                    None => out.push(key),
                }
            }
        }
        (Value::Sequence(a), Value::Sequence(b)) => {
            for (i, (v, w)) in a.iter().zip(b).enumerate() {
                dropped(v, w, &format!("{at}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// `doc` as the API type `T`, refusing fields `T` does not have.
fn typed<T: DeserializeOwned + serde::Serialize>(doc: &Value, what: &str) -> T {
    let t: T = serde_yaml::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{what} does not read as its Kubernetes type: {e}"));
    let round = serde_yaml::to_value(&t).unwrap();
    let mut lost = Vec::new();
    dropped(doc, &round, what, &mut lost);
    assert!(
        lost.is_empty(),
        "fields the Kubernetes API does not have: {lost:?}"
    );
    t
}

fn of_kind<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} named {name}"))
}

/// `strata serve` with a pod's arguments, through the same translation the
/// binary applies (vLLM's spellings, KAITO's config file).
fn serve_args(args: &[String]) -> ServeArgs {
    let mut argv = vec!["strata".to_string(), "serve".to_string()];
    argv.extend(vllm_compat::translate(args.to_vec(), &serve_flags()).unwrap());
    match Cli::try_parse_from(&argv) {
        Ok(Cli {
            command: Command::Serve(a),
        }) => *a,
        Ok(_) => unreachable!(),
        Err(e) => panic!("`strata serve` refuses {args:?}: {e}"),
    }
}

/// The environment variables strata reads: its flags' and the launchers'.
fn known_env() -> Vec<String> {
    let cmd = <Cli as clap::CommandFactory>::command();
    let serve = cmd.find_subcommand("serve").unwrap();
    let mut names: Vec<String> = serve
        .get_arguments()
        .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().to_string()))
        .collect();
    names.extend(
        [
            "POD_INDEX",
            "LWS_GROUP_SIZE",
            "LWS_WORKER_INDEX",
            "LWS_LEADER_ADDRESS",
            "RUST_LOG",
        ]
        .map(String::from),
    );
    names
}

fn container(t: &PodTemplateSpec) -> &Container {
    let spec = t.spec.as_ref().unwrap();
    assert_eq!(spec.containers.len(), 1);
    &spec.containers[0]
}

fn container_port(c: &Container, name: &str) -> i32 {
    c.ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("container port `{name}` is not declared"))
        .container_port
}

fn port_number(c: &Container, port: &IntOrString) -> i32 {
    match port {
        IntOrString::Int(n) => *n,
        IntOrString::String(name) => container_port(c, name),
    }
}

/// What ties a pod template to the binary; returns its serve arguments.
fn check_pod(t: &PodTemplateSpec, what: &str) -> ServeArgs {
    let c = container(t);
    let args = serve_args(c.args.as_deref().unwrap_or_default());
    let known = known_env();
    for e in c.env.iter().flatten() {
        assert!(
            known.contains(&e.name),
            "{what}: strata does not read `{}`",
            e.name
        );
    }
    assert_eq!(
        container_port(c, "http"),
        args.port as i32,
        "{what}: http port"
    );
    assert_eq!(
        container_port(c, "cluster"),
        launch::DEFAULT_CLUSTER_PORT as i32,
        "{what}: the leader's cluster port"
    );
    assert_eq!(
        container_port(c, "worker"),
        args.worker_port as i32,
        "{what}: worker port"
    );
    let probes = [
        (&c.startup_probe, strata_server::HEALTH_PATH),
        (&c.readiness_probe, strata_server::HEALTH_PATH),
        (&c.liveness_probe, strata_server::LIVENESS_PATH),
    ];
    for (probe, path) in probes {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("{what}: a probe is missing or not httpGet"));
        assert_eq!(get.path.as_deref(), Some(path), "{what}: probe path");
        assert_eq!(
            port_number(c, &get.port),
            args.port as i32,
            "{what}: probe port"
        );
    }
    let sc = t.spec.as_ref().unwrap().security_context.as_ref();
    assert_eq!(
        sc.and_then(|s| s.run_as_non_root),
        Some(true),
        "{what}: runAsNonRoot"
    );
    args
}

fn role(args: &ServeArgs, env: &[(&str, String)], hostname: &str) -> Role {
    let env: HashMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    let flags = LaunchFlags {
        nnodes: args.nnodes,
        node_rank: args.node_rank,
        leader_addr: args.leader_addr.clone(),
        headless_service: args.headless_service.clone(),
    };
    launch::resolve(&flags, &|k| env.get(k).cloned(), hostname).unwrap()
}

/// A Service's selector picks exactly pod `pod` of the set `set`.
fn selects_pod(svc: &Service, set: &str, pod: usize) {
    let sel = svc.spec.as_ref().unwrap().selector.clone().unwrap();
    assert_eq!(
        sel.get("statefulset.kubernetes.io/pod-name")
            .map(String::as_str),
        Some(format!("{set}-{pod}").as_str()),
        "{sel:?}"
    );
}

#[test]
fn the_statefulset_gives_every_pod_its_rank_and_pod_0_as_leader() {
    let docs = documents("kubernetes/statefulset.yaml");
    let sts: StatefulSet = typed(of_kind(&docs, "StatefulSet", "strata"), "StatefulSet");
    let headless: Service = typed(
        of_kind(&docs, "Service", "strata-headless"),
        "headless Service",
    );
    let api: Service = typed(of_kind(&docs, "Service", "strata"), "API Service");
    let spec = sts.spec.as_ref().unwrap();
    assert_eq!(spec.pod_management_policy.as_deref(), Some("Parallel"));
    let template = &spec.template;
    let args = check_pod(template, "StatefulSet");
    let c = container(template);

    // The headless Service names the pods and publishes them before they are ready.
    assert_eq!(spec.service_name.as_deref(), Some("strata-headless"));
    let hs = headless.spec.as_ref().unwrap();
    assert_eq!(hs.cluster_ip.as_deref(), Some("None"));
    assert_eq!(hs.publish_not_ready_addresses, Some(true));
    let cluster_port = &hs.ports.as_ref().unwrap()[0];
    assert_eq!(cluster_port.port, launch::DEFAULT_CLUSTER_PORT as i32);
    assert_eq!(
        port_number(c, cluster_port.target_port.as_ref().unwrap()),
        launch::DEFAULT_CLUSTER_PORT as i32
    );
    let pod_labels = template.metadata.as_ref().unwrap().labels.clone().unwrap();
    for (k, v) in hs.selector.as_ref().unwrap() {
        assert_eq!(
            pod_labels.get(k),
            Some(v),
            "the headless Service selects the pods"
        );
    }

    // The API goes to pod 0 only, port 80 to the server's port.
    selects_pod(&api, "strata", 0);
    let p = &api.spec.as_ref().unwrap().ports.as_ref().unwrap()[0];
    assert_eq!(p.port, 80);
    assert_eq!(
        port_number(c, p.target_port.as_ref().unwrap()),
        args.port as i32
    );

    // POD_INDEX comes from the pod-index label.
    let pod_index = c
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "POD_INDEX")
        .unwrap();
    let field = pod_index
        .value_from
        .as_ref()
        .unwrap()
        .field_ref
        .as_ref()
        .unwrap();
    assert_eq!(
        field.field_path,
        "metadata.labels['apps.kubernetes.io/pod-index']"
    );

    // Each pod, named as the StatefulSet names it, is its own rank, and
    // every one finds the leader at pod 0 through the headless Service.
    let replicas = spec.replicas.unwrap() as usize;
    assert_eq!(
        args.nnodes,
        Some(replicas),
        "--nnodes must equal the replicas"
    );
    for i in 0..replicas {
        let r = role(
            &args,
            &[("POD_INDEX", i.to_string())],
            &format!("strata-{i}"),
        );
        assert_eq!((r.node_rank, r.nnodes), (i, replicas));
        assert_eq!(
            r.leader_addr.as_deref(),
            Some("strata-0.strata-headless:29500")
        );
    }
}

#[test]
fn the_leaderworkerset_runs_one_command_for_leader_and_workers() {
    let docs = documents("kubernetes/leaderworkerset.yaml");
    let lws = of_kind(&docs, "LeaderWorkerSet", "strata");
    assert_eq!(lws["apiVersion"], "leaderworkerset.x-k8s.io/v1");
    let t = &lws["spec"]["leaderWorkerTemplate"];
    let size = t["size"].as_u64().unwrap() as usize;
    let leader: PodTemplateSpec = typed(&t["leaderTemplate"], "leaderTemplate");
    let worker: PodTemplateSpec = typed(&t["workerTemplate"], "workerTemplate");
    let leader_args = check_pod(&leader, "leaderTemplate");
    check_pod(&worker, "workerTemplate");
    assert_eq!(container(&leader).args, container(&worker).args);
    // LWS's variables alone give each pod its role.
    for i in 0..size {
        let env = [
            ("LWS_GROUP_SIZE", size.to_string()),
            ("LWS_WORKER_INDEX", i.to_string()),
            ("LWS_LEADER_ADDRESS", "strata-0.strata.default".to_string()),
        ];
        let r = role(&leader_args, &env, &format!("strata-0-{i}"));
        assert_eq!((r.node_rank, r.nnodes), (i, size));
        assert_eq!(
            r.leader_addr.as_deref(),
            Some("strata-0.strata.default:29500")
        );
    }
    let api: Service = typed(of_kind(&docs, "Service", "strata"), "API Service");
    let sel = api.spec.unwrap().selector.unwrap();
    let labels = leader.metadata.unwrap().labels.unwrap();
    assert_eq!(
        sel.get("role"),
        labels.get("role"),
        "the API Service selects the leader"
    );
}

#[test]
fn the_kaito_workspace_runs_strata_with_kaitos_config_file() {
    let docs = documents("kaito/workspace.yaml");
    let ws = of_kind(&docs, "Workspace", "workspace-llama-3-3-70b");
    assert_eq!(ws["apiVersion"], "kaito.sh/v1beta1");
    let count = ws["resource"]["count"].as_u64().unwrap() as usize;
    let mut template: PodTemplateSpec = typed(&ws["inference"]["template"], "inference.template");
    // KAITO mounts the ConfigMap at /mnt/config; here it is a file.
    let cm = of_kind(
        &docs,
        "ConfigMap",
        "workspace-llama-3-3-70b-inference-config",
    );
    // Not the vllm_compat test's folder: the two run at once in one process.
    let dir = std::env::temp_dir().join(format!("strata-kaito-workspace-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("inference_config.yaml");
    std::fs::write(
        &config,
        cm["data"]["inference_config.yaml"].as_str().unwrap(),
    )
    .unwrap();
    let c = &mut template.spec.as_mut().unwrap().containers[0];
    let flag = "--kaito-config-file=/mnt/config/inference_config.yaml";
    let arg = c
        .args
        .iter_mut()
        .flatten()
        .find(|a| *a == flag)
        .expect(flag);
    *arg = format!("--kaito-config-file={}", config.display());
    let args = check_pod(&template, "Workspace");
    std::fs::remove_dir_all(&dir).unwrap();
    // The ConfigMap's vllm: section took effect over the command line.
    assert_eq!(args.max_model_len, Some(16384));
    assert_eq!(args.max_num_seqs, 64);
    assert_eq!(args.gpu_memory_utilization, 0.9);

    let leader_svc: Service = typed(
        of_kind(&docs, "Service", "workspace-llama-3-3-70b-leader"),
        "leader Service",
    );
    selects_pod(&leader_svc, "workspace-llama-3-3-70b", 0);
    assert_eq!(
        leader_svc
            .spec
            .as_ref()
            .unwrap()
            .publish_not_ready_addresses,
        Some(true)
    );
    for i in 0..count {
        let host = format!("workspace-llama-3-3-70b-{i}");
        let r = role(&args, &[("POD_INDEX", i.to_string())], &host);
        assert_eq!((r.node_rank, r.nnodes), (i, count));
        assert_eq!(
            r.leader_addr.as_deref(),
            Some("workspace-llama-3-3-70b-leader:29500")
        );
    }
}
