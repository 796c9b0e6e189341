//! The deployment artifacts under `deploy/` hold together, checked without a cluster or a
//! Docker engine:
//!
//! - every Kubernetes document of every overlay, rendered the way kustomize renders it,
//!   deserialises into its typed struct (k8s-openapi; KEDA's kinds into local structs that
//!   deny unknown fields) and serialises back to the same document, so a misspelt field
//!   fails instead of being ignored;
//! - the references between documents resolve: Service and PodDisruptionBudget selectors,
//!   named ports, Secret and ConfigMap keys, the KEDA target and authentication, images;
//! - the compose file has the promised services, health checks and start order;
//! - the Dockerfiles build the images the manifests and the compose file name, as non-root;
//! - every flag and `PATCHPORT_*` variable the deployment passes is one the real binary
//!   reads (`--help`), the compose health check runs against a real registry, and the
//!   KEDA queue query runs on the real schema (SQLite always, Postgres when configured).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscalerBehavior;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Namespace, PodSpec, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use patchport_tests::process::{Cli, Database, Serve, Server, file_url};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_patchport");
const OVERLAYS: &[&str] = &["production", "staging"];
const REGISTRY_DEPLOYMENT: &str = "patchport-registry";
const WORKER_DEPLOYMENT: &str = "patchport-worker";

/// The command line after every branch of the "deploy and operate" issue has landed:
/// flags and the variables clap reads for them.
const FINAL_SERVE: &[(&str, &str)] = &[
    ("--listen", "PATCHPORT_LISTEN"),
    ("--database", "PATCHPORT_DATABASE"),
    ("--blobs", "PATCHPORT_BLOBS"),
    ("--workers", "PATCHPORT_WORKERS"),
    ("--lease-seconds", "PATCHPORT_LEASE_SECONDS"),
    ("--metrics-listen", "PATCHPORT_METRICS_LISTEN"),
    ("--log-format", "PATCHPORT_LOG_FORMAT"),
    ("--auth", "PATCHPORT_AUTH"),
    ("--insecure-no-auth", ""),
    ("--tls-cert", "PATCHPORT_TLS_CERT"),
    ("--tls-key", "PATCHPORT_TLS_KEY"),
];
const FINAL_WORKER: &[(&str, &str)] = &[
    ("--registry", "PATCHPORT_REGISTRY"),
    ("--ca-cert", "PATCHPORT_CA_CERT"),
    ("--device", "PATCHPORT_DEVICE"),
    ("--id", "PATCHPORT_WORKER_ID"),
    ("--metrics-listen", "PATCHPORT_METRICS_LISTEN"),
    ("--log-format", "PATCHPORT_LOG_FORMAT"),
];
/// Variables read outside clap (no flag of their own): the registry's admin token turns
/// authentication on; a worker's token goes into every request, over plain text inside
/// the cluster only when allowed.
const NON_FLAG_VARIABLES: &[&str] = &[
    "PATCHPORT_ADMIN_TOKEN",
    "PATCHPORT_TOKEN",
    "PATCHPORT_ALLOW_PLAINTEXT_TOKEN",
    // The signing key PEM itself (a secret; `--signing-key FILE` is the flag's form).
    "PATCHPORT_SIGNING_KEY",
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn deploy() -> PathBuf {
    repo().join("deploy")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every YAML document of a file, as JSON values (empty documents skipped).
fn yaml_documents(path: &Path) -> Vec<Value> {
    let text = read(path);
    let mut docs = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let value = Value::deserialize(doc)
            .unwrap_or_else(|e| panic!("{}: not valid YAML: {e}", path.display()));
        if !value.is_null() {
            docs.push(value);
        }
    }
    docs
}

// ---------------------------------------------------------------------------------------
// kustomize, the subset the overlays may use

/// A kustomization this test can render exactly. Anything else kustomize offers (patches,
/// generators, name prefixes, ...) is an unknown field here and fails the test: keep the
/// overlays to what is rendered below, or teach `render` the new feature.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Kustomization {
    api_version: String,
    kind: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    resources: Vec<String>,
    #[serde(default)]
    images: Vec<ImageOverride>,
    #[serde(default)]
    replicas: Vec<ReplicaOverride>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ImageOverride {
    name: String,
    #[serde(default)]
    new_name: Option<String>,
    #[serde(default)]
    new_tag: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplicaOverride {
    name: String,
    count: i64,
}

/// Kinds that have no namespace (kustomize's namespace transformer leaves them alone).
const CLUSTER_SCOPED: &[&str] = &[
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PersistentVolume",
    "StorageClass",
    "ClusterTriggerAuthentication",
];

fn kustomization(dir: &Path) -> Kustomization {
    let path = dir.join("kustomization.yaml");
    let k: Kustomization =
        serde_yaml_ng::from_str(&read(&path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(k.kind, "Kustomization", "{}", path.display());
    assert!(
        k.api_version.starts_with("kustomize.config.k8s.io/"),
        "{}",
        path.display()
    );
    k
}

/// `name[:tag][@digest]` split into name and the rest (kept verbatim).
fn split_image(image: &str) -> (&str, Option<&str>, Option<&str>) {
    let (rest, digest) = match image.split_once('@') {
        Some((r, d)) => (r, Some(d)),
        None => (image, None),
    };
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    match rest[last_slash..].rfind(':') {
        Some(i) => (
            &rest[..last_slash + i],
            Some(&rest[last_slash + i + 1..]),
            digest,
        ),
        None => (rest, None, digest),
    }
}

fn image_name(image: &str) -> &str {
    split_image(image).0
}

/// Every pod spec inside a workload document.
fn pod_specs_mut(doc: &mut Value) -> Vec<&mut Value> {
    let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
    let spec = match kind.as_str() {
        "Pod" => doc.get_mut("spec"),
        "CronJob" => doc.pointer_mut("/spec/jobTemplate/spec/template/spec"),
        _ => doc.pointer_mut("/spec/template/spec"),
    };
    spec.into_iter().collect()
}

/// Renders a kustomization directory: its resources (files, or directories rendered
/// recursively), then its namespace, images and replicas, as kustomize does.
fn render(dir: &Path) -> Vec<Value> {
    let k = kustomization(dir);
    let mut docs = Vec::new();
    for resource in &k.resources {
        let path = dir.join(resource);
        if path.is_dir() {
            docs.extend(render(&path));
        } else {
            docs.extend(yaml_documents(&path));
        }
    }
    let mut used_images = BTreeSet::new();
    let mut used_replicas = BTreeSet::new();
    for doc in &mut docs {
        let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
        let name = doc["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if let Some(ns) = &k.namespace
            && !CLUSTER_SCOPED.contains(&kind.as_str())
        {
            doc["metadata"]["namespace"] = Value::String(ns.clone());
        }
        for r in &k.replicas {
            if r.name == name && matches!(kind.as_str(), "Deployment" | "StatefulSet") {
                doc["spec"]["replicas"] = Value::from(r.count);
                used_replicas.insert(r.name.clone());
            }
        }
        for spec in pod_specs_mut(doc) {
            for list in ["initContainers", "containers"] {
                let Some(containers) = spec.get_mut(list).and_then(Value::as_array_mut) else {
                    continue;
                };
                for c in containers {
                    let Some(image) = c["image"].as_str().map(str::to_owned) else {
                        continue;
                    };
                    let (name, tag, digest) = split_image(&image);
                    let Some(o) = k.images.iter().find(|o| o.name == name) else {
                        continue;
                    };
                    used_images.insert(o.name.clone());
                    let mut new = o.new_name.clone().unwrap_or_else(|| name.to_owned());
                    if let Some(tag) = o.new_tag.as_deref().or(tag) {
                        new.push(':');
                        new.push_str(tag);
                    }
                    if let Some(d) = digest {
                        new.push('@');
                        new.push_str(d);
                    }
                    c["image"] = Value::String(new);
                }
            }
        }
    }
    for o in &k.images {
        assert!(
            used_images.contains(&o.name),
            "{}: images entry {:?} matches no container image",
            dir.display(),
            o.name
        );
    }
    for r in &k.replicas {
        assert!(
            used_replicas.contains(&r.name),
            "{}: replicas entry {:?} matches no Deployment",
            dir.display(),
            r.name
        );
    }
    docs
}

// ---------------------------------------------------------------------------------------
// Typed documents

/// KEDA's ScaledObject (keda.sh/v1alpha1), the fields this deployment uses.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ScaledObject {
    api_version: String,
    kind: String,
    metadata: ObjectMeta,
    spec: ScaledObjectSpec,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ScaledObjectSpec {
    scale_target_ref: ScaleTargetRef,
    #[serde(skip_serializing_if = "Option::is_none")]
    min_replica_count: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_replica_count: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    polling_interval: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cooldown_period: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    advanced: Option<ScaledObjectAdvanced>,
    triggers: Vec<ScaleTrigger>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ScaleTargetRef {
    #[serde(skip_serializing_if = "Option::is_none")]
    api_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    kind: Option<String>,
    name: String,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ScaledObjectAdvanced {
    #[serde(skip_serializing_if = "Option::is_none")]
    horizontal_pod_autoscaler_config: Option<HpaConfig>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct HpaConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    behavior: Option<HorizontalPodAutoscalerBehavior>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ScaleTrigger {
    #[serde(rename = "type")]
    kind: String,
    /// KEDA's trigger metadata is a map of strings: a number here is an error.
    metadata: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    authentication_ref: Option<AuthenticationRef>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct AuthenticationRef {
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    kind: Option<String>,
}

/// KEDA's TriggerAuthentication (keda.sh/v1alpha1), secret references only.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TriggerAuthentication {
    api_version: String,
    kind: String,
    metadata: ObjectMeta,
    spec: TriggerAuthenticationSpec,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TriggerAuthenticationSpec {
    secret_target_ref: Vec<SecretTargetRef>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct SecretTargetRef {
    parameter: String,
    name: String,
    key: String,
}

/// Where two JSON values differ (paths), for a readable failure.
fn differences(a: &Value, b: &Value, path: &str, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let p = format!("{path}/{k}");
                match (x.get(k), y.get(k)) {
                    (Some(u), Some(v)) => differences(u, v, &p, out),
                    (Some(_), None) => out.push(format!("{p} (unknown to the typed struct)")),
                    (None, Some(_)) => out.push(format!("{p} (added by the typed struct)")),
                    (None, None) => {}
                }
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (u, v)) in x.iter().zip(y).enumerate() {
                differences(u, v, &format!("{path}/{i}"), out);
            }
        }
        _ if a == b => {}
        // Quantities are strings in the typed structs; YAML may write `1` for "1".
        (Value::Number(n), Value::String(s)) if n.to_string() == *s => {}
        _ => out.push(format!("{path}: {a} became {b}")),
    }
}

/// Deserialises `doc` into `T` and checks that serialising it back gives `doc` again:
/// k8s-openapi ignores unknown fields, so this is what catches a misspelt one.
fn typed<T: DeserializeOwned + Serialize>(doc: &Value, what: &str) -> T {
    let t: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{what}: does not deserialise: {e}"));
    let back = serde_json::to_value(&t).expect("serialise");
    let mut diff = Vec::new();
    differences(doc, &back, "", &mut diff);
    assert!(diff.is_empty(), "{what}: {}", diff.join("; "));
    t
}

#[derive(Debug, Default)]
struct Manifests {
    deployments: Vec<Deployment>,
    services: Vec<Service>,
    secrets: Vec<Secret>,
    config_maps: Vec<ConfigMap>,
    pdbs: Vec<PodDisruptionBudget>,
    namespaces: Vec<Namespace>,
    scaled_objects: Vec<ScaledObject>,
    trigger_auths: Vec<TriggerAuthentication>,
}

fn name_of(meta: &ObjectMeta) -> &str {
    meta.name.as_deref().unwrap_or_default()
}

impl Manifests {
    fn parse(docs: &[Value], origin: &str) -> Self {
        let mut m = Manifests::default();
        let mut seen = BTreeSet::new();
        for doc in docs {
            let kind = doc["kind"].as_str().unwrap_or_default();
            let api = doc["apiVersion"].as_str().unwrap_or_default();
            let name = doc["metadata"]["name"].as_str().unwrap_or_default();
            let what = format!("{origin}: {kind} {name:?}");
            assert!(!name.is_empty(), "{what}: no metadata.name");
            assert!(
                seen.insert((kind.to_owned(), name.to_owned())),
                "{what}: defined twice"
            );
            match (api, kind) {
                ("apps/v1", "Deployment") => m.deployments.push(typed(doc, &what)),
                ("v1", "Service") => m.services.push(typed(doc, &what)),
                ("v1", "Secret") => m.secrets.push(typed(doc, &what)),
                ("v1", "ConfigMap") => m.config_maps.push(typed(doc, &what)),
                ("v1", "Namespace") => m.namespaces.push(typed(doc, &what)),
                ("policy/v1", "PodDisruptionBudget") => m.pdbs.push(typed(doc, &what)),
                ("keda.sh/v1alpha1", "ScaledObject") => m.scaled_objects.push(typed(doc, &what)),
                ("keda.sh/v1alpha1", "TriggerAuthentication") => {
                    m.trigger_auths.push(typed(doc, &what))
                }
                _ => panic!("{what}: apiVersion {api:?} kind {kind:?} is not checked by this test"),
            }
        }
        m
    }

    fn deployment(&self, name: &str) -> &Deployment {
        self.deployments
            .iter()
            .find(|d| name_of(&d.metadata) == name)
            .unwrap_or_else(|| panic!("no Deployment {name:?}"))
    }

    fn secret_keys(&self, name: &str) -> Option<BTreeSet<String>> {
        self.secrets
            .iter()
            .find(|s| name_of(&s.metadata) == name)
            .map(|s| {
                let mut keys: BTreeSet<String> =
                    s.data.iter().flat_map(|d| d.keys().cloned()).collect();
                keys.extend(s.string_data.iter().flat_map(|d| d.keys().cloned()));
                keys
            })
    }

    fn config_map_keys(&self, name: &str) -> Option<BTreeSet<String>> {
        self.config_maps
            .iter()
            .find(|c| name_of(&c.metadata) == name)
            .map(|c| c.data.iter().flat_map(|d| d.keys().cloned()).collect())
    }
}

fn pod_spec(d: &Deployment) -> &PodSpec {
    d.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .unwrap_or_else(|| panic!("Deployment {:?} has no pod spec", name_of(&d.metadata)))
}

fn pod_labels(d: &Deployment) -> BTreeMap<String, String> {
    d.spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap_or_default()
}

fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn match_labels(s: &LabelSelector) -> BTreeMap<String, String> {
    assert!(
        s.match_expressions.as_ref().is_none_or(Vec::is_empty),
        "matchExpressions are not checked by this test"
    );
    s.match_labels.clone().unwrap_or_default()
}

fn the_container(d: &Deployment) -> &Container {
    let containers = &pod_spec(d).containers;
    assert_eq!(
        containers.len(),
        1,
        "Deployment {:?}: one container expected",
        name_of(&d.metadata)
    );
    &containers[0]
}

/// The container port a Service `targetPort` or probe port names.
fn container_port(c: &Container, port: &IntOrString) -> Option<i32> {
    let ports = c.ports.as_deref().unwrap_or_default();
    match port {
        IntOrString::Int(n) => ports.iter().find(|p| p.container_port == *n),
        IntOrString::String(name) => ports.iter().find(|p| p.name.as_deref() == Some(name)),
    }
    .map(|p| p.container_port)
}

/// The port number a `--listen`/`--registry` style `host:port` value ends with.
fn port_of(addr: &str) -> i32 {
    let addr = addr.trim_end_matches('/');
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{addr:?} has no port"))
}

/// The value of `--flag VALUE` in an argument list.
fn flag_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

fn container_args(c: &Container) -> Vec<String> {
    assert!(
        c.command.is_none(),
        "container {:?}: keep the image's entrypoint, give `args`",
        c.name
    );
    c.args.clone().unwrap_or_default()
}

/// The names built by the Dockerfiles, as the compose file tags them.
fn built_images() -> BTreeSet<String> {
    compose()
        .services
        .values()
        .filter(|s| s.build.is_some())
        .map(|s| image_name(&s.image).to_owned())
        .collect()
}

/// Checks one rendered overlay. Returns the manifests for further checks.
fn check_manifests(origin: &str, docs: &[Value]) -> Manifests {
    let m = Manifests::parse(docs, origin);
    let registry = m.deployment(REGISTRY_DEPLOYMENT);
    let worker = m.deployment(WORKER_DEPLOYMENT);

    // Every Deployment's selector selects its own pods.
    for d in &m.deployments {
        let spec = d.spec.as_ref().expect("deployment spec");
        assert!(
            selects(&match_labels(&spec.selector), &pod_labels(d)),
            "{origin}: Deployment {:?}: selector does not match its pod labels",
            name_of(&d.metadata)
        );
    }

    // Registry: replicas, readiness on the gRPC health service, the Service, the PDB.
    let replicas = registry.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    assert!(
        replicas >= 2,
        "{origin}: registry has {replicas} replica(s), want >= 2"
    );
    let rc = the_container(registry);
    let args = container_args(rc);
    assert_eq!(args.first().map(String::as_str), Some("serve"), "{origin}");
    let listen = flag_value(&args, "--listen").expect("registry --listen");
    assert!(
        listen.starts_with("0.0.0.0:") || listen.starts_with("[::]:"),
        "{origin}: the registry must listen on every interface, not {listen}"
    );
    let grpc_port = port_of(listen);
    assert_eq!(
        flag_value(&args, "--workers"),
        Some("0"),
        "{origin}: in-process workers off"
    );
    assert_eq!(
        container_port(rc, &IntOrString::String("grpc".into())),
        Some(grpc_port),
        "{origin}: the container port named grpc is the --listen port"
    );
    for (what, probe) in [
        ("readinessProbe", rc.readiness_probe.as_ref()),
        ("livenessProbe", rc.liveness_probe.as_ref()),
        ("startupProbe", rc.startup_probe.as_ref()),
    ] {
        let probe = probe.unwrap_or_else(|| panic!("{origin}: registry has no {what}"));
        let grpc = probe
            .grpc
            .as_ref()
            .unwrap_or_else(|| panic!("{origin}: registry {what} is not a grpc probe"));
        assert_eq!(grpc.port, grpc_port, "{origin}: {what} port");
        assert!(
            grpc.service.as_deref().unwrap_or_default().is_empty(),
            "{origin}: {what} asks the server as a whole"
        );
    }

    let registry_labels = pod_labels(registry);
    let worker_labels = pod_labels(worker);
    let services: Vec<&Service> = m
        .services
        .iter()
        .filter(|s| {
            let sel = s
                .spec
                .as_ref()
                .and_then(|s| s.selector.clone())
                .unwrap_or_default();
            selects(&sel, &registry_labels)
        })
        .collect();
    assert_eq!(
        services.len(),
        1,
        "{origin}: exactly one Service selects the registry pods"
    );
    let svc = services[0];
    let svc_name = name_of(&svc.metadata);
    assert_eq!(svc_name, "patchport-registry", "{origin}");
    let svc_spec = svc.spec.as_ref().expect("service spec");
    assert!(
        !selects(
            svc_spec.selector.as_ref().expect("selector"),
            &worker_labels
        ),
        "{origin}: the registry Service must not select worker pods"
    );
    let mut svc_grpc_port = None;
    for p in svc_spec.ports.as_deref().unwrap_or_default() {
        let target = p.target_port.clone().unwrap_or(IntOrString::Int(p.port));
        let resolved = container_port(rc, &target).unwrap_or_else(|| {
            panic!(
                "{origin}: Service port {:?} targets {target:?}, not a registry container port",
                p.name
            )
        });
        if resolved == grpc_port {
            svc_grpc_port = Some(p.port);
        }
    }
    let svc_grpc_port =
        svc_grpc_port.unwrap_or_else(|| panic!("{origin}: the Service does not expose gRPC"));

    assert_eq!(m.pdbs.len(), 1, "{origin}: one PodDisruptionBudget");
    let pdb = m.pdbs[0].spec.as_ref().expect("pdb spec");
    let pdb_sel = match_labels(pdb.selector.as_ref().expect("pdb selector"));
    assert!(
        selects(&pdb_sel, &registry_labels),
        "{origin}: the PDB selects the registry pods"
    );
    assert!(
        !selects(&pdb_sel, &worker_labels),
        "{origin}: the PDB must not select workers"
    );
    assert!(
        pdb.min_available.is_some() || pdb.max_unavailable.is_some(),
        "{origin}: the PDB sets minAvailable or maxUnavailable"
    );
    if let Some(IntOrString::Int(n)) = pdb.min_available {
        assert!(
            n >= 1 && n < replicas,
            "{origin}: minAvailable {n} with {replicas} replicas blocks every drain"
        );
    }

    // Workers: a GPU each, the registry Service as their registry.
    let wc = the_container(worker);
    let gpu = wc
        .resources
        .as_ref()
        .and_then(|r| r.limits.as_ref())
        .and_then(|l| l.get("nvidia.com/gpu"))
        .unwrap_or_else(|| panic!("{origin}: the worker does not request nvidia.com/gpu"));
    assert_eq!(gpu.0, "1", "{origin}: one GPU per worker");
    let wargs = container_args(wc);
    assert_eq!(
        wargs.first().map(String::as_str),
        Some("worker"),
        "{origin}"
    );
    assert!(
        flag_value(&wargs, "--device").is_some_and(|d| d.starts_with("cuda")),
        "{origin}: GPU workers run --device cuda"
    );
    let url = flag_value(&wargs, "--registry").expect("worker --registry");
    assert_eq!(
        url,
        format!("http://{svc_name}:{svc_grpc_port}"),
        "{origin}: workers reach the registry through its Service"
    );
    assert!(
        worker.spec.as_ref().and_then(|s| s.replicas).is_none(),
        "{origin}: KEDA owns the worker replica count; leave `replicas` out"
    );

    // Every pod runs as non-root, without privilege escalation.
    for d in &m.deployments {
        let pod = pod_spec(d);
        let pod_sc = pod.security_context.as_ref();
        for c in &pod.containers {
            let sc = c.security_context.as_ref();
            let non_root = sc
                .and_then(|s| s.run_as_non_root)
                .or(pod_sc.and_then(|s| s.run_as_non_root));
            let uid = sc
                .and_then(|s| s.run_as_user)
                .or(pod_sc.and_then(|s| s.run_as_user));
            assert_eq!(
                non_root,
                Some(true),
                "{origin}: container {:?} sets runAsNonRoot",
                c.name
            );
            assert!(
                uid.is_some_and(|u| u > 0),
                "{origin}: container {:?} runs as a fixed non-root uid",
                c.name
            );
            assert_eq!(
                sc.and_then(|s| s.allow_privilege_escalation),
                Some(false),
                "{origin}: container {:?} forbids privilege escalation",
                c.name
            );
        }
    }

    // Secret and ConfigMap references resolve to existing keys.
    let mut secret_refs: Vec<(String, String, String)> = Vec::new();
    for d in &m.deployments {
        for c in &pod_spec(d).containers {
            let who = format!("{origin}: container {:?}", c.name);
            for e in c.env.as_deref().unwrap_or_default() {
                let Some(from) = &e.value_from else { continue };
                if let Some(s) = &from.secret_key_ref {
                    secret_refs.push((who.clone(), s.name.clone(), s.key.clone()));
                }
                if let Some(r) = &from.config_map_key_ref {
                    let keys = m
                        .config_map_keys(&r.name)
                        .unwrap_or_else(|| panic!("{who}: no ConfigMap {:?}", r.name));
                    assert!(
                        keys.contains(&r.key),
                        "{who}: ConfigMap {:?} has no key {:?}",
                        r.name,
                        r.key
                    );
                }
            }
            for from in c.env_from.as_deref().unwrap_or_default() {
                if let Some(r) = &from.config_map_ref {
                    assert!(
                        m.config_map_keys(&r.name).is_some(),
                        "{who}: no ConfigMap {:?}",
                        r.name
                    );
                }
                if let Some(r) = &from.secret_ref {
                    assert!(
                        m.secret_keys(&r.name).is_some(),
                        "{who}: no Secret {:?}",
                        r.name
                    );
                }
            }
        }
    }
    for t in &m.trigger_auths {
        for r in &t.spec.secret_target_ref {
            secret_refs.push((
                format!("{origin}: TriggerAuthentication {:?}", name_of(&t.metadata)),
                r.name.clone(),
                r.key.clone(),
            ));
        }
    }
    for (who, secret, key) in &secret_refs {
        let keys = m
            .secret_keys(secret)
            .unwrap_or_else(|| panic!("{who}: no Secret {secret:?}"));
        assert!(
            keys.contains(key),
            "{who}: Secret {secret:?} has no key {key:?}"
        );
    }
    // The registry gets the database and the bucket credentials; workers get neither.
    let registry_env: BTreeSet<&str> = rc.env.iter().flatten().map(|e| e.name.as_str()).collect();
    for var in [
        "PATCHPORT_DATABASE",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    ] {
        assert!(registry_env.contains(var), "{origin}: registry lacks {var}");
    }
    for e in wc.env.iter().flatten() {
        assert!(
            e.name != "PATCHPORT_DATABASE" && !e.name.starts_with("AWS_"),
            "{origin}: workers speak only gRPC; {} does not belong there",
            e.name
        );
    }

    // KEDA: the postgresql scaler on the queue, scaling the worker Deployment.
    assert_eq!(m.scaled_objects.len(), 1, "{origin}: one ScaledObject");
    let so = &m.scaled_objects[0];
    assert_eq!(so.api_version, "keda.sh/v1alpha1");
    let target = &so.spec.scale_target_ref;
    assert_eq!(
        target.name, WORKER_DEPLOYMENT,
        "{origin}: KEDA scales the workers"
    );
    assert_eq!(target.kind.as_deref().unwrap_or("Deployment"), "Deployment");
    assert!(
        so.spec.max_replica_count.unwrap_or(100) >= so.spec.min_replica_count.unwrap_or(0),
        "{origin}: maxReplicaCount >= minReplicaCount"
    );
    assert_eq!(so.spec.triggers.len(), 1, "{origin}: one trigger");
    let trigger = &so.spec.triggers[0];
    assert_eq!(trigger.kind, "postgresql", "{origin}");
    let query = trigger.metadata.get("query").expect("trigger query");
    assert!(
        query.contains("jobs") && query.contains("'queued'"),
        "{origin}: the trigger counts queued jobs: {query}"
    );
    let target_value: f64 = trigger
        .metadata
        .get("targetQueryValue")
        .and_then(|v| v.parse().ok())
        .expect("numeric targetQueryValue");
    assert!(target_value > 0.0);
    let auth = trigger
        .authentication_ref
        .as_ref()
        .expect("trigger authenticationRef");
    let ta = m
        .trigger_auths
        .iter()
        .find(|t| name_of(&t.metadata) == auth.name)
        .unwrap_or_else(|| panic!("{origin}: no TriggerAuthentication {:?}", auth.name));
    assert!(
        ta.spec
            .secret_target_ref
            .iter()
            .any(|r| r.parameter == "connection"),
        "{origin}: the postgresql scaler gets its connection string from a Secret"
    );
    assert!(
        trigger
            .metadata
            .keys()
            .all(|k| !k.to_lowercase().contains("password") && k != "connection"),
        "{origin}: no credentials in the trigger metadata"
    );

    // Images: the ones the Dockerfiles build (as compose tags them).
    let built = built_images();
    for d in &m.deployments {
        for c in &pod_spec(d).containers {
            let image = c.image.as_deref().unwrap_or_default();
            let (name, tag, _) = split_image(image);
            let base_name = name.rsplit_once("patchport/").map(|(_, n)| n);
            assert!(
                base_name.is_some_and(|n| built.contains(&format!("patchport/{n}"))),
                "{origin}: image {image} is not one the Dockerfiles build ({built:?})"
            );
            assert!(
                tag.is_some_and(|t| t != "latest"),
                "{origin}: image {image} needs a fixed tag"
            );
        }
    }
    m
}

#[test]
fn every_overlay_renders_into_valid_consistent_manifests() {
    let base = render(&deploy().join("kubernetes/base"));
    check_manifests("base", &base);
    for overlay in OVERLAYS {
        let dir = deploy().join("kubernetes/overlays").join(overlay);
        let k = kustomization(&dir);
        let docs = render(&dir);
        let m = check_manifests(overlay, &docs);
        // The namespace is set everywhere and created by the overlay.
        let ns = k.namespace.as_deref().expect("overlays set a namespace");
        assert!(
            m.namespaces.iter().any(|n| name_of(&n.metadata) == ns),
            "{overlay}: creates the namespace {ns}"
        );
        for doc in &docs {
            if doc["kind"] != "Namespace" {
                assert_eq!(
                    doc["metadata"]["namespace"], ns,
                    "{overlay}: {}",
                    doc["metadata"]["name"]
                );
            }
        }
        // Each image is rewritten to where the overlay says.
        for o in &k.images {
            let new_name = o.new_name.as_deref().unwrap_or(&o.name);
            assert!(
                m.deployments
                    .iter()
                    .any(|d| pod_spec(d).containers.iter().any(|c| c
                        .image
                        .as_deref()
                        .is_some_and(|i| image_name(i) == new_name))),
                "{overlay}: no container runs {new_name}"
            );
        }
    }
}

/// kustomize itself (`kubectl kustomize`) renders each overlay to the same documents as
/// this test's renderer; skipped where kubectl is not installed.
#[test]
fn the_renderer_agrees_with_kustomize() {
    let available = Command::new("kubectl")
        .args(["version", "--client"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !available {
        eprintln!("kustomize comparison skipped: kubectl not installed");
        return;
    }
    for overlay in OVERLAYS {
        let dir = deploy().join("kubernetes/overlays").join(overlay);
        let out = Command::new("kubectl")
            .arg("kustomize")
            .arg(&dir)
            .output()
            .expect("run kubectl kustomize");
        assert!(
            out.status.success(),
            "kubectl kustomize {overlay}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).expect("utf-8");
        let key = |d: &Value| {
            (
                d["kind"].as_str().unwrap_or_default().to_owned(),
                d["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        };
        let theirs: BTreeMap<_, Value> = serde_yaml_ng::Deserializer::from_str(&text)
            .map(|d| Value::deserialize(d).expect("kustomize output is YAML"))
            .filter(|v| !v.is_null())
            .map(|v| (key(&v), v))
            .collect();
        let ours: BTreeMap<_, Value> = render(&dir).into_iter().map(|v| (key(&v), v)).collect();
        assert_eq!(
            theirs.keys().collect::<Vec<_>>(),
            ours.keys().collect::<Vec<_>>(),
            "{overlay}: the same documents"
        );
        for (k, v) in &ours {
            let mut diff = Vec::new();
            differences(&theirs[k], v, "", &mut diff);
            assert!(diff.is_empty(), "{overlay}: {k:?}: {}", diff.join("; "));
        }
    }
}

// ---------------------------------------------------------------------------------------
// compose

/// No top-level `name:` (docker-compose 1.29 refuses it; the project name comes from
/// `-p`): an unknown field fails to parse.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ComposeFile {
    services: BTreeMap<String, ComposeService>,
    #[serde(default)]
    volumes: BTreeMap<String, Option<Value>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ComposeService {
    image: String,
    #[serde(default)]
    build: Option<ComposeBuild>,
    #[serde(default)]
    command: Option<Vec<String>>,
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    environment: BTreeMap<String, String>,
    #[serde(default)]
    volumes: Vec<String>,
    #[serde(default)]
    ports: Vec<String>,
    #[serde(default)]
    healthcheck: Option<ComposeHealthcheck>,
    #[serde(default)]
    depends_on: BTreeMap<String, ComposeDependency>,
    #[serde(default)]
    deploy: Option<ComposeDeploy>,
    #[serde(default)]
    profiles: Vec<String>,
    #[serde(default)]
    restart: Option<String>,
    #[serde(default)]
    stop_grace_period: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ComposeBuild {
    context: String,
    dockerfile: String,
    #[serde(default)]
    target: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ComposeHealthcheck {
    test: Vec<String>,
    #[serde(default)]
    interval: Option<String>,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    retries: Option<u32>,
    #[serde(default)]
    start_period: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ComposeDependency {
    condition: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ComposeDeploy {
    #[serde(default)]
    replicas: Option<u32>,
    #[serde(default)]
    resources: Option<Value>,
}

fn compose() -> ComposeFile {
    let path = deploy().join("compose.yaml");
    // The second registry replica is the first one merged (`<<: *registry`).
    let mut value: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&read(&path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    value
        .apply_merge()
        .unwrap_or_else(|e| panic!("{}: merge keys: {e}", path.display()));
    serde_yaml_ng::from_value(value).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

impl ComposeFile {
    fn service(&self, name: &str) -> &ComposeService {
        self.services
            .get(name)
            .unwrap_or_else(|| panic!("compose: no service {name:?}"))
    }

    /// Services started without a profile.
    fn default_services(&self) -> impl Iterator<Item = (&String, &ComposeService)> {
        self.services.iter().filter(|(_, s)| s.profiles.is_empty())
    }
}

/// `scheme://[user[:password]@]host[:port][/path]` → (user, password, host, port).
fn url_parts(url: &str) -> (String, String, String, Option<u16>) {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or_default();
    let (userinfo, hostport) = authority.rsplit_once('@').unwrap_or(("", authority));
    let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) => (h, p.parse().ok()),
        None => (hostport, None),
    };
    (user.into(), password.into(), host.into(), port)
}

#[test]
fn compose_runs_the_production_topology() {
    let c = compose();
    for s in ["postgres", "minio", "bucket", "registry", "worker"] {
        assert!(c.services.contains_key(s), "compose: no {s} service");
    }
    for (name, s) in &c.services {
        assert!(
            !s.image.ends_with(":latest") && s.image.contains(':'),
            "compose: {name} pins its image tag ({})",
            s.image
        );
        for (dep, how) in &s.depends_on {
            let target = c.service(dep);
            match how.condition.as_str() {
                "service_healthy" => assert!(
                    target.healthcheck.is_some(),
                    "compose: {name} waits for {dep} to be healthy, which has no health check"
                ),
                "service_completed_successfully" => {
                    assert_eq!(
                        target.restart.as_deref(),
                        Some("no"),
                        "compose: {dep} is one-shot"
                    )
                }
                other => panic!("compose: {name} depends on {dep} with condition {other:?}"),
            }
        }
        for v in &s.volumes {
            let named = v.split(':').next().unwrap_or_default();
            assert!(
                named.starts_with('.') || named.starts_with('/') || c.volumes.contains_key(named),
                "compose: {name} mounts undeclared volume {named}"
            );
        }
    }
    for s in ["postgres", "minio", "registry"] {
        let h = c
            .service(s)
            .healthcheck
            .as_ref()
            .unwrap_or_else(|| panic!("compose: {s} has no health check"));
        assert_eq!(
            h.test.first().map(String::as_str),
            Some("CMD"),
            "compose: {s}: exec form"
        );
        assert!(
            h.interval.is_some() && h.timeout.is_some() && h.retries.is_some(),
            "compose: {s}: health check interval, timeout and retries"
        );
    }
    // Patchport processes drain on SIGTERM: give them longer than compose's 10 s default.
    for (name, s) in &c.services {
        if s.image.starts_with("patchport/") {
            let grace = s.stop_grace_period.as_deref().unwrap_or("10s");
            let secs: u64 = grace
                .strip_suffix('s')
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| {
                    panic!("compose: {name}: stop_grace_period {grace:?} in seconds")
                });
            assert!(
                secs >= 30,
                "compose: {name}: stop_grace_period {grace} is short for a drain"
            );
        }
    }
    // The CUDA worker, when enabled, reserves an NVIDIA GPU.
    let gpu = c.service("worker-cuda");
    assert_eq!(gpu.profiles, ["gpu"], "compose: the CUDA worker is opt-in");
    let reservation = gpu
        .deploy
        .as_ref()
        .and_then(|d| d.resources.as_ref())
        .and_then(|r| r.pointer("/reservations/devices/0"))
        .expect("compose: worker-cuda reserves a device");
    assert_eq!(reservation["driver"], "nvidia");
    assert_eq!(reservation["capabilities"][0], "gpu");

    // Postgres, MinIO and the bucket, wired to the registry.
    let pg = c.service("postgres");
    let minio = c.service("minio");
    let bucket = c.service("bucket");
    let registry = c.service("registry");
    assert!(
        image_name(&bucket.image).ends_with("minio/mc"),
        "compose: the bucket job runs minio/mc"
    );
    let mb = bucket.entrypoint.clone().unwrap_or_default();
    assert!(
        mb.iter().any(|a| a == "mb") && mb.iter().any(|a| a == "--ignore-existing"),
        "compose: the bucket job creates the bucket, idempotently: {mb:?}"
    );
    assert_eq!(bucket.depends_on["minio"].condition, "service_healthy");
    assert_eq!(registry.depends_on["postgres"].condition, "service_healthy");
    assert_eq!(
        registry.depends_on["bucket"].condition,
        "service_completed_successfully"
    );

    let env = &registry.environment;
    let (user, password, host, port) = url_parts(&env["PATCHPORT_DATABASE"]);
    assert!(env["PATCHPORT_DATABASE"].starts_with("postgres://"));
    assert_eq!(
        host, "postgres",
        "compose: the registry's database is the postgres service"
    );
    assert_eq!(port, Some(5432));
    assert_eq!(user, pg.environment["POSTGRES_USER"]);
    assert_eq!(password, pg.environment["POSTGRES_PASSWORD"]);
    assert!(env["PATCHPORT_DATABASE"].ends_with(&format!("/{}", pg.environment["POSTGRES_DB"])));

    let (_, _, endpoint_host, endpoint_port) = url_parts(&env["AWS_ENDPOINT_URL"]);
    assert_eq!(
        endpoint_host, "minio",
        "compose: the registry's S3 endpoint is the minio service"
    );
    assert_eq!(endpoint_port, Some(9000));
    assert_eq!(
        env["AWS_ACCESS_KEY_ID"],
        minio.environment["MINIO_ROOT_USER"]
    );
    assert_eq!(
        env["AWS_SECRET_ACCESS_KEY"],
        minio.environment["MINIO_ROOT_PASSWORD"]
    );
    assert_eq!(env.get("AWS_ALLOW_HTTP").map(String::as_str), Some("true"));
    let blobs = env["PATCHPORT_BLOBS"]
        .strip_prefix("s3://")
        .expect("s3:// blobs");
    let bucket_name = blobs.split('/').next().unwrap_or_default();
    let mc_host = bucket
        .environment
        .iter()
        .find(|(k, _)| k.starts_with("MC_HOST_"))
        .expect("the bucket job's MC_HOST_<alias>");
    let alias = mc_host.0.trim_start_matches("MC_HOST_");
    assert!(
        mb.iter().any(|a| *a == format!("{alias}/{bucket_name}")),
        "compose: the bucket job creates {bucket_name}, the bucket of PATCHPORT_BLOBS"
    );
    let (mc_user, mc_password, mc_host_name, _) = url_parts(mc_host.1);
    assert_eq!(mc_host_name, "minio");
    assert_eq!(mc_user, minio.environment["MINIO_ROOT_USER"]);
    assert_eq!(mc_password, minio.environment["MINIO_ROOT_PASSWORD"]);

    // The registry listens where the workers and the published port expect it.
    let rargs = registry.command.clone().expect("registry command");
    assert_eq!(rargs[0], "serve");
    let listen_port = port_of(flag_value(&rargs, "--listen").expect("--listen"));
    assert_eq!(flag_value(&rargs, "--workers"), Some("0"));
    assert!(
        registry
            .ports
            .iter()
            .any(|p| p.ends_with(&format!(":{listen_port}"))),
        "compose: the registry's gRPC port is published"
    );
    let health = registry.healthcheck.as_ref().expect("registry health");
    assert!(
        health.start_period.is_some(),
        "compose: the registry migrates at start; give its health check a start period"
    );
    let health = &health.test;
    assert_eq!(health[0], "CMD");
    assert!(
        health[1].ends_with("patchport") && health[2] == "health",
        "{health:?}"
    );

    // Two CPU workers, started once the registry is healthy.
    let mut cpu_workers = 0;
    for (name, s) in c.default_services() {
        let Some(cmd) = &s.command else { continue };
        if cmd.first().map(String::as_str) != Some("worker") {
            continue;
        }
        assert_eq!(flag_value(cmd, "--device"), Some("cpu"), "compose: {name}");
        assert_eq!(
            flag_value(cmd, "--registry"),
            Some(format!("http://registry:{listen_port}").as_str()),
            "compose: {name} talks to the registry service"
        );
        assert_eq!(s.depends_on["registry"].condition, "service_healthy");
        assert!(
            s.environment
                .keys()
                .all(|k| !k.starts_with("AWS_") && k != "PATCHPORT_DATABASE"),
            "compose: {name} speaks only gRPC"
        );
        cpu_workers += s.deploy.as_ref().and_then(|d| d.replicas).unwrap_or(1);
    }
    assert_eq!(cpu_workers, 2, "compose: two CPU workers");
}

// ---------------------------------------------------------------------------------------
// Dockerfiles

#[derive(Debug, Default)]
struct Stage {
    from: String,
    name: Option<String>,
    /// Instructions, continuation lines joined: (KEYWORD, rest).
    instructions: Vec<(String, String)>,
}

fn dockerfile_stages(path: &Path) -> Vec<Stage> {
    let text = read(path);
    let mut logical = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if trimmed.starts_with('#') {
            continue;
        }
        if let Some(body) = trimmed.strip_suffix('\\') {
            current.push_str(body);
            current.push(' ');
        } else {
            current.push_str(trimmed);
            logical.push(std::mem::take(&mut current));
        }
    }
    let mut stages: Vec<Stage> = Vec::new();
    // Global `ARG NAME=default`s (before the first FROM), substituted into FROM lines.
    let mut args: Vec<(String, String)> = Vec::new();
    for line in logical {
        let (keyword, rest) = line.split_once(char::is_whitespace).unwrap_or((&line, ""));
        let keyword = keyword.to_uppercase();
        let mut rest = rest.trim().to_owned();
        if keyword == "ARG" && stages.is_empty() {
            if let Some((name, default)) = rest.split_once('=') {
                let mut default = default.trim_matches('"').to_owned();
                for (n, v) in &args {
                    default = default.replace(&format!("${{{n}}}"), v);
                }
                args.push((name.to_owned(), default));
            }
            continue;
        }
        if keyword == "FROM" {
            for (n, v) in &args {
                rest = rest.replace(&format!("${{{n}}}"), v);
            }
            let words: Vec<&str> = rest.split_whitespace().collect();
            let name = match words.as_slice() {
                [_, as_, name] if as_.eq_ignore_ascii_case("as") => Some((*name).to_owned()),
                _ => None,
            };
            stages.push(Stage {
                from: words.first().copied().unwrap_or_default().to_owned(),
                name,
                instructions: Vec::new(),
            });
        } else if let Some(stage) = stages.last_mut() {
            stage.instructions.push((keyword, rest));
        }
    }
    stages
}

/// The instructions in effect for `stage`, following `FROM <earlier stage>` chains
/// (oldest first).
fn effective<'a>(stages: &'a [Stage], stage: &'a Stage) -> Vec<&'a (String, String)> {
    let parent = stages
        .iter()
        .find(|s| s.name.as_deref() == Some(stage.from.as_str()));
    let mut all = parent.map(|p| effective(stages, p)).unwrap_or_default();
    all.extend(stage.instructions.iter());
    all
}

#[test]
fn dockerfiles_build_the_named_images_as_non_root() {
    let ignore = read(&repo().join(".dockerignore"));
    let ignored: BTreeSet<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    for needed in [
        "Cargo.toml",
        "Cargo.lock",
        "proto",
        "migrations",
        "services",
        "workers",
        "tests",
        "*.toml",
        "*.lock",
        "*",
    ] {
        assert!(
            !ignored.contains(needed),
            ".dockerignore drops {needed}, which the build needs"
        );
    }
    for heavy in ["target", ".git"] {
        assert!(
            ignored.contains(heavy),
            ".dockerignore keeps {heavy} out of the context"
        );
    }

    let c = compose();
    let mut built = BTreeMap::new();
    for (name, s) in &c.services {
        let Some(b) = &s.build else { continue };
        assert_eq!(
            b.context, "..",
            "compose: {name} builds from the repository root"
        );
        let path = deploy().join(&b.context).join(&b.dockerfile);
        let stages = dockerfile_stages(&path);
        let stage = match &b.target {
            Some(t) => stages
                .iter()
                .find(|s| s.name.as_deref() == Some(t.as_str()))
                .unwrap_or_else(|| panic!("{}: no stage {t}", path.display())),
            None => stages.last().expect("a stage"),
        };
        let what = format!(
            "{} ({})",
            path.display(),
            stage.name.as_deref().unwrap_or("last stage")
        );
        built.insert(image_name(&s.image).to_owned(), what.clone());
        let eff = effective(&stages, stage);
        let last = |kw: &str| {
            eff.iter()
                .rev()
                .find(|(k, _)| k == kw)
                .map(|(_, r)| r.as_str())
        };
        let user = last("USER").unwrap_or_else(|| panic!("{what}: no USER"));
        let uid: u32 = user
            .split(':')
            .next()
            .and_then(|u| u.parse().ok())
            .unwrap_or_else(|| panic!("{what}: USER {user} is not a numeric uid"));
        assert!(uid > 0, "{what}: runs as root");
        let entrypoint = last("ENTRYPOINT").unwrap_or_else(|| panic!("{what}: no ENTRYPOINT"));
        assert!(
            entrypoint.contains("/usr/local/bin/patchport"),
            "{what}: {entrypoint}"
        );
        let copied = eff
            .iter()
            .any(|(k, r)| k == "COPY" && r.contains("/usr/local/bin/patchport"));
        assert!(copied, "{what}: copies the binary in");
        // The builder stage: a locked release build of the binary package.
        let builder = stages
            .iter()
            .find(|st| {
                eff.iter().any(|(k, r)| {
                    k == "COPY"
                        && st
                            .name
                            .as_deref()
                            .is_some_and(|n| r.contains(&format!("--from={n}")))
                })
            })
            .unwrap_or_else(|| panic!("{what}: copies from no named build stage"));
        // A stage that only renames another (`FROM ${BINARY} AS binary`): the default one.
        let mut builder = builder;
        while builder.instructions.is_empty() {
            builder = stages
                .iter()
                .find(|st| st.name.as_deref() == Some(builder.from.as_str()))
                .unwrap_or_else(|| panic!("{what}: stage {:?} renames no stage", builder.name));
        }
        let build = builder
            .instructions
            .iter()
            .find(|(k, r)| k == "RUN" && r.contains("cargo build"))
            .unwrap_or_else(|| panic!("{what}: the build stage runs no cargo build"));
        for arg in ["--release", "--locked", "-p patchport"] {
            assert!(build.1.contains(arg), "{what}: cargo build without {arg}");
        }
        assert!(
            build
                .1
                .contains("--mount=type=cache,target=/usr/local/cargo/registry"),
            "{what}: the cargo registry is a cache mount"
        );
        let cuda = s.image.contains("cuda");
        assert_eq!(
            build.1.contains("--features cuda"),
            cuda,
            "{what}: --features cuda"
        );
        if cuda {
            assert!(
                builder.from.starts_with("nvidia/cuda:") && builder.from.contains("-devel-"),
                "{what}"
            );
            assert!(
                stage.from.starts_with("nvidia/cuda:") && stage.from.contains("-runtime-"),
                "{what}"
            );
        }
        if s.command
            .as_ref()
            .and_then(|c| c.first())
            .map(String::as_str)
            == Some("serve")
        {
            let port = port_of(
                flag_value(s.command.as_ref().expect("command"), "--listen").expect("--listen"),
            );
            let exposed = last("EXPOSE").unwrap_or_default();
            assert!(
                exposed
                    .split_whitespace()
                    .any(|p| p.trim_end_matches("/tcp") == port.to_string()),
                "{what}: EXPOSE {port}"
            );
        }
    }
    for want in [
        "patchport/registry",
        "patchport/worker",
        "patchport/worker-cuda",
    ] {
        assert!(
            built.contains_key(want),
            "compose builds {want} (built: {built:?})"
        );
    }
}

// ---------------------------------------------------------------------------------------
// The binary accepts what the deployment passes

fn help(subcommand: &str) -> String {
    let out = Cli::new(BIN).args([subcommand, "--help"]).output();
    assert!(out.status.success(), "patchport {subcommand} --help failed");
    String::from_utf8(out.stdout).expect("utf-8 help")
}

fn help_flags(help: &str) -> BTreeSet<String> {
    help.split(|c: char| {
        c.is_whitespace() || c == ',' || c == '[' || c == ']' || c == '=' || c == '<'
    })
    .filter(|w| w.starts_with("--") && w.len() > 2)
    .map(|w| {
        w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
            .to_owned()
    })
    .collect()
}

fn help_env(help: &str) -> BTreeSet<String> {
    help.match_indices("env: ")
        .map(|(i, _)| {
            help[i + 5..]
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect()
        })
        .collect()
}

/// Every (subcommand, argument list, PATCHPORT_* variables) the deployment starts.
fn invocations() -> Vec<(String, Vec<String>, BTreeSet<String>)> {
    let mut out = Vec::new();
    let c = compose();
    for (name, s) in &c.services {
        let Some(cmd) = &s.command else { continue };
        if !s.image.starts_with("patchport/") {
            continue;
        }
        let vars = s
            .environment
            .keys()
            .filter(|k| k.starts_with("PATCHPORT_"))
            .cloned()
            .collect();
        out.push((format!("compose {name}"), cmd.clone(), vars));
        if let Some(h) = &s.healthcheck {
            out.push((
                format!("compose {name} healthcheck"),
                h.test[2..].to_vec(),
                BTreeSet::new(),
            ));
        }
    }
    for overlay in OVERLAYS {
        let m = Manifests::parse(
            &render(&deploy().join("kubernetes/overlays").join(overlay)),
            overlay,
        );
        for d in &m.deployments {
            for ctr in &pod_spec(d).containers {
                let mut vars: BTreeSet<String> = ctr
                    .env
                    .iter()
                    .flatten()
                    .map(|e| e.name.clone())
                    .filter(|n| n.starts_with("PATCHPORT_"))
                    .collect();
                for from in ctr.env_from.iter().flatten() {
                    if let Some(r) = &from.config_map_ref {
                        vars.extend(
                            m.config_map_keys(&r.name)
                                .unwrap_or_default()
                                .into_iter()
                                .filter(|k| k.starts_with("PATCHPORT_")),
                        );
                    }
                }
                out.push((format!("{overlay} {}", ctr.name), container_args(ctr), vars));
            }
        }
    }
    out
}

#[test]
fn the_binary_accepts_every_flag_the_deployment_passes() {
    let mut missing = Vec::new();
    for (who, args, _) in invocations() {
        let sub = &args[0];
        let flags = help_flags(&help(sub));
        for a in args.iter().filter(|a| a.starts_with("--")) {
            if !flags.contains(a.as_str()) {
                missing.push(format!("{who}: patchport {sub} {a}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "flags the binary does not know: {missing:?}"
    );
}

/// Fails until the metrics/logging branch has landed (PATCHPORT_METRICS_LISTEN).
#[test]
fn the_binary_reads_every_variable_the_deployment_sets() {
    let mut missing = Vec::new();
    for (who, args, vars) in invocations() {
        let sub = &args[0];
        let known = help_env(&help(sub));
        for v in vars {
            if !known.contains(&v) && !NON_FLAG_VARIABLES.contains(&v.as_str()) {
                missing.push(format!("{who}: patchport {sub} does not read {v}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "variables the binary ignores: {missing:?}"
    );
}

/// The command line of the README's "Running in production" table. Fails until every
/// branch of the deploy-and-operate issue (metrics, logs, auth, TLS) has landed.
#[test]
fn the_binary_has_the_documented_command_line() {
    let mut missing = Vec::new();
    for (sub, expected) in [("serve", FINAL_SERVE), ("worker", FINAL_WORKER)] {
        let text = help(sub);
        let (flags, env) = (help_flags(&text), help_env(&text));
        for (flag, var) in expected {
            if !flags.contains(*flag) {
                missing.push(format!("patchport {sub} {flag}"));
            }
            if !var.is_empty() && !env.contains(*var) {
                missing.push(format!("patchport {sub} env {var}"));
            }
        }
    }
    assert!(missing.is_empty(), "missing from the binary: {missing:?}");
}

// ---------------------------------------------------------------------------------------
// Against a real registry

fn serve(database: &Database, blobs: &Path) -> Server {
    Serve::builder(BIN)
        .workers(0)
        .database(database.url())
        .blobs(file_url(blobs))
        .start()
}

/// The compose health check, pointed at a real registry: exit 0 while serving; exit 1
/// when nothing listens.
#[test]
fn the_compose_health_check_passes_against_a_serving_registry() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = serve(&Database::sqlite(), &dir.path().join("blobs"));
    let test = compose()
        .service("registry")
        .healthcheck
        .as_ref()
        .expect("health")
        .test
        .clone();
    let mut args = test[2..].to_vec();
    let at = args
        .iter()
        .position(|a| a == "--registry")
        .expect("--registry")
        + 1;
    args[at] = registry.url();
    let health = Cli::new(BIN).args(&args);
    let out = health.output();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "SERVING");

    let json = health.clone().arg("--json").output();
    let v: Value = serde_json::from_slice(&json.stdout).expect("json");
    assert_eq!(v["status"], "SERVING");

    let unknown = health
        .clone()
        .args(["--service", "no.such.Service"])
        .output();
    assert!(
        !unknown.status.success(),
        "an unknown service is not healthy"
    );

    drop(registry);
    // Nothing listens there any more.
    let out = health.output();
    assert_eq!(
        out.status.code(),
        Some(1),
        "health check of a stopped registry fails"
    );
}

fn keda_query() -> String {
    let m = Manifests::parse(&render(&deploy().join("kubernetes/base")), "base");
    m.scaled_objects[0].spec.triggers[0].metadata["query"].clone()
}

/// Runs a client command against `url`; its stdout.
fn cli(url: &str, args: &[&str]) -> String {
    patchport_tests::process::cli(BIN, url).args(args).ok()
}

/// Publishes v2 of the llama-micro fixture over v1 with one patch on v1: one port job
/// queued (the registry runs no worker).
fn queue_one_port(url: &str) {
    let fx = patchport_tests::fixtures().join("llama-micro");
    let path = |p: &str| fx.join(p).to_str().expect("utf-8 path").to_owned();
    let base = "acme/llama-micro";
    cli(
        url,
        &[
            "base",
            "push",
            &path("v1"),
            "--name",
            base,
            "--version",
            "v1",
        ],
    );
    cli(
        url,
        &[
            "patch",
            "push",
            &path("patches/lora-qv"),
            "--name",
            "acme/qv",
            "--version",
            "1",
            "--base",
            "acme/llama-micro:v1",
        ],
    );
    cli(
        url,
        &[
            "base",
            "push",
            &path("v2"),
            "--name",
            base,
            "--version",
            "v2",
            "--parent",
            "v1",
        ],
    );
}

/// The KEDA query counts the queued port on the schema the registry migrates to: on
/// SQLite always (same table and states), on Postgres when PATCHPORT_TEST_DATABASE_URL
/// is set.
#[tokio::test]
async fn the_keda_query_counts_queued_ports_on_the_real_schema() {
    let query = keda_query();
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Database::sqlite();
    let registry = serve(&db, &dir.path().join("blobs"));
    queue_one_port(&registry.url());
    drop(registry);
    let pool = sqlx::SqlitePool::connect(db.url())
        .await
        .expect("open sqlite");
    let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(query.clone()))
        .fetch_one(&pool)
        .await
        .expect("the KEDA query runs on SQLite");
    assert_eq!(n, 1, "one port queued");

    let Some(db) = Database::postgres("postgres KEDA query check") else {
        return;
    };
    let registry = serve(&db, &dir.path().join("blobs-pg"));
    queue_one_port(&registry.url());
    drop(registry);
    let pool = sqlx::PgPool::connect(db.url())
        .await
        .expect("open postgres");
    let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(query))
        .fetch_one(&pool)
        .await
        .expect("the KEDA query runs on Postgres");
    assert_eq!(n, 1, "one port queued");
}
