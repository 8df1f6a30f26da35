//! The objects a waypoint runs as, built by pure functions from a [`WaypointDeployment`]
//! record: its ServiceAccount, a Deployment of the waypoint binary, a Service on the HBONE
//! port (for an ingress gateway: `--role ingress`, its listeners' ports on a LoadBalancer
//! Service, the pod allowed to bind ports below 1024), the namespace's root-certificate ConfigMap and, as the Gateway asks
//! ([`crate::waypoint::scaling`]), a HorizontalPodAutoscaler and a PodDisruptionBudget. All
//! but the ConfigMap are owned by the Gateway, so deleting it garbage-collects them.
//! [`super::writer`] applies them.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HorizontalPodAutoscaler, HorizontalPodAutoscalerSpec, MetricSpec, MetricTarget,
    ResourceMetricSource,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction,
    ObjectFieldSelector, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ProjectedVolumeSource, SeccompProfile,
    SecurityContext, Service, ServiceAccountTokenProjection, ServicePort, ServiceSpec, Sysctl, Volume, VolumeMount,
    VolumeProjection,
};
use k8s_openapi::api::core::v1::{ResourceRequirements, TopologySpreadConstraint};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::resources::served_version;
use super::writer::WriterConfig;
use crate::mesh_config::TraceExport;
use crate::model::{Kind, ObjectMeta, ServiceAccount};
use crate::waypoint::WaypointDeployment;

/// Selects a waypoint's pods (Gateway API's standard label).
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// Marks pods as a managed gateway; the node agent never captures them.
pub const MANAGED_LABEL: &str = "gateway.istio.io/managed";
pub const MANAGED_VALUE: &str = "istio.io-mesh-controller";
/// Waypoints carry mesh traffic themselves and must not be captured.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";

/// The waypoint serves `/metrics` and `/healthz/ready` here.
pub const METRICS_PORT: u16 = 15020;
/// The ConfigMap (one per waypoint namespace) holding the mesh's root certificate.
pub const ROOT_CERT_CONFIGMAP: &str = "mesh-root-cert";
/// Audience of the token waypoints present to the CA and xDS server (TokenReview checks it).
pub const TOKEN_AUDIENCE: &str = "istio-ca";
const ROOT_CERT_DIR: &str = "/var/run/secrets/mesh";
const TOKEN_DIR: &str = "/var/run/secrets/tokens";
/// The waypoint runs as the proxies' conventional user and group, Istio's 1337. It equals
/// the socket mark (`mesh_core::capture::MESH_MARK`) only by Istio's convention; they are
/// unrelated.
const PROXY_UID: i64 = 1337;

/// The owner reference to the Gateway (`None` without a uid, as in local mode).
pub fn owner_reference(record: &WaypointDeployment) -> Option<OwnerReference> {
    if record.gateway_uid.is_empty() {
        return None;
    }
    Some(OwnerReference {
        api_version: format!("{}/{}", Kind::Gateway.group(), served_version(Kind::Gateway)),
        kind: Kind::Gateway.name().to_owned(),
        name: record.gateway.name.clone(),
        uid: record.gateway_uid.clone(),
        controller: Some(true),
        // blockOwnerDeletion would need `update` on gateways/finalizers; not worth the RBAC.
        block_owner_deletion: None,
    })
}

/// The labels selecting a waypoint's pods.
pub fn selector_labels(record: &WaypointDeployment) -> BTreeMap<String, String> {
    BTreeMap::from([(GATEWAY_NAME_LABEL.to_owned(), record.gateway.name.clone())])
}

/// Name, namespace, owner and labels: `spec.infrastructure.labels` (Gateway API) under the
/// selector and managed labels, which always win; `spec.infrastructure.annotations` too.
fn metadata(record: &WaypointDeployment, name: &str) -> ObjectMeta {
    let mut labels = record.scaling.labels.clone();
    labels.extend(selector_labels(record));
    labels.insert(MANAGED_LABEL.to_owned(), MANAGED_VALUE.to_owned());
    let annotations = &record.scaling.annotations;
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some(record.gateway.namespace.clone()),
        labels: Some(labels),
        annotations: (!annotations.is_empty()).then(|| annotations.clone()),
        owner_references: owner_reference(record).map(|o| vec![o]),
        ..ObjectMeta::default()
    }
}

/// Requests and limits from the Gateway's settings; `None` when none is set.
fn resources(record: &WaypointDeployment) -> Option<ResourceRequirements> {
    let r = &record.scaling.resources;
    let map = |cpu: &Option<String>, memory: &Option<String>| {
        let m: BTreeMap<String, Quantity> = [("cpu", cpu), ("memory", memory)]
            .into_iter()
            .filter_map(|(k, v)| Some((k.to_owned(), Quantity(v.clone()?))))
            .collect();
        (!m.is_empty()).then_some(m)
    };
    let requests = map(&r.cpu_request, &r.memory_request);
    let limits = map(&r.cpu_limit, &r.memory_limit);
    (requests.is_some() || limits.is_some()).then(|| ResourceRequirements {
        requests,
        limits,
        ..ResourceRequirements::default()
    })
}

/// Replicas spread over nodes (or zones), preferred rather than required so a small cluster
/// still schedules them.
fn spread(record: &WaypointDeployment) -> Option<Vec<TopologySpreadConstraint>> {
    let key = record.scaling.spread.topology_key()?;
    Some(vec![TopologySpreadConstraint {
        max_skew: 1,
        topology_key: key.to_owned(),
        when_unsatisfiable: "ScheduleAnyway".to_owned(),
        label_selector: Some(LabelSelector {
            match_labels: Some(selector_labels(record)),
            match_expressions: None,
        }),
        ..TopologySpreadConstraint::default()
    }])
}

/// The autoscaler of the waypoint's Deployment, when the Gateway asks for one.
pub fn hpa_for(record: &WaypointDeployment) -> Option<HorizontalPodAutoscaler> {
    let a = record.scaling.autoscale?;
    Some(HorizontalPodAutoscaler {
        metadata: metadata(record, &record.gateway.name),
        spec: Some(HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some("apps/v1".to_owned()),
                kind: "Deployment".to_owned(),
                name: record.gateway.name.clone(),
            },
            min_replicas: Some(a.min),
            max_replicas: a.max,
            metrics: Some(vec![MetricSpec {
                type_: "Resource".to_owned(),
                resource: Some(ResourceMetricSource {
                    name: "cpu".to_owned(),
                    target: MetricTarget {
                        type_: "Utilization".to_owned(),
                        average_utilization: Some(a.target_cpu),
                        ..MetricTarget::default()
                    },
                }),
                ..MetricSpec::default()
            }]),
            behavior: None,
        }),
        status: None,
    })
}

/// The disruption budget that keeps replicas through node drains, when more than one runs.
pub fn pdb_for(record: &WaypointDeployment) -> Option<PodDisruptionBudget> {
    let min = record.scaling.min_available?;
    Some(PodDisruptionBudget {
        metadata: metadata(record, &record.gateway.name),
        spec: Some(PodDisruptionBudgetSpec {
            min_available: Some(IntOrString::Int(min)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(record)),
                match_expressions: None,
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        status: None,
    })
}

pub fn service_account_for(record: &WaypointDeployment) -> ServiceAccount {
    ServiceAccount {
        metadata: metadata(record, &record.service_account),
        ..ServiceAccount::default()
    }
}

/// The waypoint binary's arguments: who it is, where the control plane is, and the files the
/// pod mounts (the root certificate and a projected token for the CA's TokenReview).
pub fn waypoint_args(record: &WaypointDeployment, config: &WriterConfig) -> Vec<String> {
    let mut args = vec![
        "--identity".into(),
        record.identity.clone(),
        "--gateway".into(),
        format!("{}/{}", record.gateway.namespace, record.gateway.name),
        "--xds-address".into(),
        config.xds_address.clone(),
        "--ca-address".into(),
        config.xds_address.clone(),
        "--trust-bundle".into(),
        format!("{ROOT_CERT_DIR}/root-cert.pem"),
        "--token-file".into(),
        format!("{TOKEN_DIR}/mesh-token"),
    ];
    // An ingress gateway binds its listeners' ports (from its xDS configuration), not HBONE.
    match record.ingress {
        None => args.extend(["--hbone-addr".into(), format!("0.0.0.0:{}", record.hbone_port)]),
        Some(_) => args.extend(["--role".into(), "ingress".into()]),
    }
    args.extend(["--stats-addr".into(), format!("0.0.0.0:{METRICS_PORT}")]);
    // Spans go to the mesh's tracing provider; how many is the Telemetry API's to say (the
    // waypoint's default is Istio's 1% until a Telemetry sets randomSamplingPercentage).
    match &record.trace_export {
        Some(TraceExport::Zipkin(url)) => args.extend(["--zipkin-address".into(), url.clone()]),
        Some(TraceExport::Otlp(url)) => args.extend(["--otlp-address".into(), url.clone()]),
        None => {}
    }
    if let Some(mode) = &record.path_normalization {
        args.extend(["--path-normalization".into(), mode.clone()]);
    }
    args
}

/// The namespace's copy of the root certificate waypoints verify the control plane with.
pub fn root_cert_for(namespace: &str, config: &WriterConfig) -> ConfigMap {
    ConfigMap {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(ROOT_CERT_CONFIGMAP.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some([(MANAGED_LABEL.to_owned(), MANAGED_VALUE.to_owned())].into()),
            ..Default::default()
        },
        data: Some([("root-cert.pem".to_owned(), config.root_cert.clone())].into()),
        ..ConfigMap::default()
    }
}

fn waypoint_volumes() -> (Vec<Volume>, Vec<VolumeMount>) {
    let volumes = vec![
        Volume {
            name: "root-cert".to_owned(),
            config_map: Some(ConfigMapVolumeSource {
                name: ROOT_CERT_CONFIGMAP.to_owned(),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: "mesh-token".to_owned(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(TOKEN_AUDIENCE.to_owned()),
                        expiration_seconds: Some(43200),
                        path: "mesh-token".to_owned(),
                    }),
                    ..VolumeProjection::default()
                }]),
                ..ProjectedVolumeSource::default()
            }),
            ..Volume::default()
        },
    ];
    let mounts = vec![
        VolumeMount {
            name: "root-cert".to_owned(),
            mount_path: ROOT_CERT_DIR.to_owned(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
        VolumeMount {
            name: "mesh-token".to_owned(),
            mount_path: TOKEN_DIR.to_owned(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
    ];
    (volumes, mounts)
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.to_owned(),
                api_version: None,
            }),
            ..EnvVarSource::default()
        }),
        value: None,
    }
}

fn port(name: &str, port: u16) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_owned()),
        container_port: i32::from(port),
        protocol: Some("TCP".to_owned()),
        ..ContainerPort::default()
    }
}

/// The container's ports: HBONE for a waypoint, the listeners' for an ingress gateway; and
/// the metrics port.
fn container_ports(record: &WaypointDeployment) -> Vec<ContainerPort> {
    let mut ports = match &record.ingress {
        None => vec![port("hbone", record.hbone_port)],
        Some(ingress) => ingress
            .ports
            .iter()
            .map(|p| ContainerPort {
                container_port: i32::from(p.port),
                protocol: Some("TCP".to_owned()),
                ..ContainerPort::default()
            })
            .collect(),
    };
    ports.push(port("metrics", METRICS_PORT));
    ports
}

/// An ingress gateway listening below 1024 (80, 443) as its unprivileged user, without
/// NET_BIND_SERVICE: the pod's (namespaced, Pod Security "safe") sysctl lowers the bound,
/// as Istio's gateways do.
fn pod_security(record: &WaypointDeployment) -> Option<PodSecurityContext> {
    let low = record.ingress.as_ref()?.ports.iter().any(|p| p.port < 1024);
    low.then(|| PodSecurityContext {
        sysctls: Some(vec![Sysctl {
            name: "net.ipv4.ip_unprivileged_port_start".to_owned(),
            value: "0".to_owned(),
        }]),
        ..PodSecurityContext::default()
    })
}

pub fn deployment_for(record: &WaypointDeployment, config: &WriterConfig) -> Deployment {
    let meta = metadata(record, &record.gateway.name);
    let mut pod_labels = meta.labels.clone().unwrap_or_default();
    pod_labels.insert(DATAPLANE_MODE_LABEL.to_owned(), "none".to_owned());
    let (volumes, mounts) = waypoint_volumes();
    let container = Container {
        volume_mounts: Some(mounts),
        name: "waypoint".to_owned(),
        image: Some(config.image.clone()),
        args: Some(waypoint_args(record, config)),
        env: Some(vec![
            field_env("POD_NAME", "metadata.name"),
            field_env("POD_NAMESPACE", "metadata.namespace"),
            field_env("POD_IP", "status.podIP"),
            field_env("SERVICE_ACCOUNT", "spec.serviceAccountName"),
        ]),
        ports: Some(container_ports(record)),
        resources: resources(record),
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/healthz/ready".to_owned()),
                port: IntOrString::Int(i32::from(METRICS_PORT)),
                ..HTTPGetAction::default()
            }),
            period_seconds: Some(5),
            ..Probe::default()
        }),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                add: None,
            }),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            run_as_user: Some(PROXY_UID),
            run_as_group: Some(PROXY_UID),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_owned(),
                localhost_profile: None,
            }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    };
    Deployment {
        spec: Some(DeploymentSpec {
            // Left out under an autoscaler, which then owns the count (server-side apply).
            replicas: record.scaling.replicas,
            selector: LabelSelector {
                match_labels: Some(selector_labels(record)),
                match_expressions: None,
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: meta.annotations.clone(),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(record.service_account.clone()),
                    // The projected token above is the only credential it needs.
                    automount_service_account_token: Some(false),
                    // Requests in flight get the waypoint's drain (5 s) and a margin.
                    termination_grace_period_seconds: Some(10),
                    volumes: Some(volumes),
                    containers: vec![container],
                    topology_spread_constraints: spread(record),
                    security_context: pod_security(record),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        metadata: meta,
        status: None,
    }
}

/// A waypoint's ClusterIP Service on HBONE, or an ingress gateway's Service (LoadBalancer
/// unless the Gateway asks otherwise) on its listeners' ports, each named
/// `<protocol>-<port>` with the protocol as `appProtocol`.
pub fn service_for(record: &WaypointDeployment) -> Service {
    let (type_, ports) = match &record.ingress {
        None => (
            "ClusterIP".to_owned(),
            vec![ServicePort {
                name: Some("mesh".to_owned()),
                port: i32::from(record.hbone_port),
                target_port: Some(IntOrString::String("hbone".to_owned())),
                protocol: Some("TCP".to_owned()),
                ..ServicePort::default()
            }],
        ),
        Some(ingress) => (
            ingress.service_type.clone(),
            ingress
                .ports
                .iter()
                .map(|p| {
                    let protocol = p.protocol.to_ascii_lowercase();
                    ServicePort {
                        name: Some(format!("{protocol}-{}", p.port)),
                        port: i32::from(p.port),
                        target_port: Some(IntOrString::Int(i32::from(p.port))),
                        protocol: Some("TCP".to_owned()),
                        app_protocol: Some(protocol),
                        ..ServicePort::default()
                    }
                })
                .collect(),
        ),
    };
    // Reached from outside, the gateway must see the client's own address: its per-source
    // handshake bound, per-source rate limits, `remoteIpBlocks` without proxies in front and
    // access log all key on it. With the default (`Cluster`), kube-proxy SNATs every client
    // to a node address, so one client could exhaust a bound all share.
    let external = matches!(type_.as_str(), "LoadBalancer" | "NodePort").then(|| "Local".to_owned());
    Service {
        metadata: metadata(record, &record.gateway.name),
        spec: Some(ServiceSpec {
            type_: Some(type_),
            external_traffic_policy: external,
            selector: Some(selector_labels(record)),
            ports: Some(ports),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use super::*;
    use crate::model::ObjectKey;
    use crate::waypoint::{Condition, WaypointFor};

    pub(crate) fn record() -> WaypointDeployment {
        WaypointDeployment {
            gateway: ObjectKey::new("apps", "waypoint"),
            gateway_uid: "uid-1".into(),
            service_account: "waypoint".into(),
            identity: "spiffe://cluster.local/ns/apps/sa/waypoint".into(),
            waypoint_for: WaypointFor::Service,
            hbone_port: mesh_core::capture::HBONE_PORT,
            address: None,
            conditions: vec![
                Condition {
                    kind: "Accepted".into(),
                    status: true,
                    reason: "Accepted".into(),
                    message: String::new(),
                },
                Condition {
                    kind: "Programmed".into(),
                    status: false,
                    reason: "Pending".into(),
                    message: "waiting for the deployment".into(),
                },
            ],
            scaling: Default::default(),
            trace_export: None,
            path_normalization: None,
            ingress: None,
        }
    }

    /// A Gateway asking for an autoscaler, resources, a zone spread and infrastructure labels.
    pub(crate) fn production_record() -> WaypointDeployment {
        use crate::waypoint::scaling::{read, PREFIX};
        let annotations = [
            ("min-replicas", "2"),
            ("max-replicas", "6"),
            ("cpu-request", "200m"),
            ("memory-request", "128Mi"),
            ("memory-limit", "512Mi"),
            ("topology-spread", "zone"),
        ]
        .iter()
        .map(|(k, v)| (format!("{PREFIX}{k}"), (*v).to_owned()))
        .collect();
        let infra = crate::model::gateway::Infrastructure {
            labels: [("team".to_owned(), "payments".to_owned())].into(),
            annotations: [("example.com/owner".to_owned(), "payments".to_owned())].into(),
        };
        let mut problems = Vec::new();
        let scaling = read(&annotations, Some(&infra), &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        WaypointDeployment { scaling, ..record() }
    }

    /// The brief's ingress gateway with an HTTP listener too, `spec.infrastructure` labels and
    /// annotations: what the controller deploys for a Gateway of class `istio`.
    pub(crate) fn ingress_record() -> WaypointDeployment {
        use crate::waypoint::{IngressDeployment, IngressPort};
        let infra = crate::model::gateway::Infrastructure {
            labels: [("team".to_owned(), "edge".to_owned())].into(),
            annotations: [(
                "service.beta.kubernetes.io/aws-load-balancer-type".to_owned(),
                "nlb".to_owned(),
            )]
            .into(),
        };
        let mut problems = Vec::new();
        let scaling = crate::waypoint::scaling::read(&BTreeMap::new(), Some(&infra), &mut problems);
        let port = |port, protocol: &str| IngressPort {
            port,
            protocol: protocol.into(),
        };
        WaypointDeployment {
            gateway: ObjectKey::new("istio-system", "istio-ingressgateway"),
            service_account: "istio-ingressgateway".into(),
            identity: "spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway".into(),
            waypoint_for: WaypointFor::None,
            scaling,
            ingress: Some(IngressDeployment {
                ports: vec![port(443, "HTTPS"), port(80, "HTTP"), port(8443, "TLS")],
                service_type: "LoadBalancer".into(),
                listeners: Vec::new(),
                addresses: Vec::new(),
            }),
            ..record()
        }
    }

    /// What the generator writes for a plain and a production waypoint, as the YAML that
    /// `scripts/validate-manifests.sh` validates against the Kubernetes schemas and the Pod
    /// Security rules. `UPDATE_GOLDEN=1` rewrites it after an intended change.
    #[test]
    fn generated_objects_are_the_validated_file() {
        let mut docs = Vec::new();
        let records = [
            ("plain.yaml", record()),
            ("production.yaml", production_record()),
            ("ingress.yaml", ingress_record()),
        ];
        for (file, r) in records {
            let mut text = String::from("# Generated by controller/src/k8s/manifests.rs (UPDATE_GOLDEN=1 cargo test -p controller manifests).\n");
            let mut add = |v: serde_json::Value| {
                text.push_str("---\n");
                text.push_str(&serde_yaml::to_string(&v).expect("yaml"));
            };
            add(serde_json::to_value(service_account_for(&r)).expect("json"));
            add(serde_json::to_value(deployment_for(&r, &config())).expect("json"));
            add(serde_json::to_value(service_for(&r)).expect("json"));
            if let Some(h) = hpa_for(&r) {
                add(serde_json::to_value(h).expect("json"));
            }
            if let Some(p) = pdb_for(&r) {
                add(serde_json::to_value(p).expect("json"));
            }
            docs.push((file, text));
        }
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/waypoint-objects");
        for (file, text) in docs {
            let path = dir.join(file);
            if std::env::var_os("UPDATE_GOLDEN").is_some() {
                std::fs::create_dir_all(&dir).expect("mkdir");
                std::fs::write(&path, &text).expect("write golden");
            }
            let want = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                want == text,
                "{} differs from the generator (UPDATE_GOLDEN=1 to rewrite):\n{text}",
                path.display()
            );
        }
    }

    #[test]
    fn deployed_waypoints_trace_to_the_mesh_provider() {
        let r = WaypointDeployment {
            trace_export: Some(TraceExport::Zipkin("http://zipkin.obs:9411/api/v2/spans".into())),
            ..record()
        };
        let args = waypoint_args(&r, &config());
        assert!(args
            .windows(2)
            .any(|w| w == ["--zipkin-address", "http://zipkin.obs:9411/api/v2/spans"]));
        let mut argv = vec!["waypoint".to_owned()];
        argv.extend(args);
        assert!(<waypoint::config::Config as clap::Parser>::try_parse_from(&argv).is_ok());
        let plain = waypoint_args(&record(), &config());
        assert!(!plain.iter().any(|a| a.contains("zipkin") || a.contains("otlp")));
    }

    #[test]
    fn deployed_waypoints_normalise_paths_as_mesh_config_says() {
        let r = WaypointDeployment {
            path_normalization: Some("decode-and-merge-slashes".into()),
            ..record()
        };
        let mut argv = vec!["waypoint".to_owned()];
        argv.extend(waypoint_args(&r, &config()));
        let cfg = <waypoint::config::Config as clap::Parser>::try_parse_from(&argv).expect("parses");
        assert_eq!(
            cfg.path_normalization,
            waypoint::http::path::Normalization::DecodeAndMergeSlashes
        );
        let plain = waypoint_args(&record(), &config());
        assert!(!plain.iter().any(|a| a == "--path-normalization"));
    }

    #[test]
    fn production_waypoints_get_an_autoscaler_a_budget_and_a_spread() {
        let r = production_record();
        let d = deployment_for(&r, &config());
        assert_eq!(
            d.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("team"))
                .map(String::as_str),
            Some("payments")
        );
        let spec = d.spec.expect("spec");
        assert_eq!(spec.replicas, None, "the autoscaler owns the count");
        let template = spec.template;
        let annotations = template
            .metadata
            .as_ref()
            .and_then(|m| m.annotations.as_ref())
            .expect("pod annotations");
        assert_eq!(annotations["example.com/owner"], "payments");
        let pod = template.spec.expect("pod spec");
        let spread = &pod.topology_spread_constraints.expect("spread")[0];
        assert_eq!(
            (spread.topology_key.as_str(), spread.max_skew),
            ("topology.kubernetes.io/zone", 1)
        );
        let resources = pod.containers[0].resources.clone().expect("resources");
        assert_eq!(resources.requests.expect("requests")["cpu"].0, "200m");
        assert_eq!(resources.limits.expect("limits")["memory"].0, "512Mi");

        let hpa = hpa_for(&r).expect("autoscaler");
        let hs = hpa.spec.expect("hpa spec");
        assert_eq!((hs.min_replicas, hs.max_replicas), (Some(2), 6));
        assert_eq!(hs.scale_target_ref.name, "waypoint");
        let pdb = pdb_for(&r).expect("budget");
        assert_eq!(pdb.spec.and_then(|s| s.min_available), Some(IntOrString::Int(1)));
        for meta in [&hpa.metadata, &pdb.metadata] {
            assert!(meta.owner_references.is_some(), "owned by the Gateway");
        }

        // A plain Gateway gets neither, and no replica count.
        let plain = record();
        assert!(hpa_for(&plain).is_none() && pdb_for(&plain).is_none());
        let d = deployment_for(&plain, &config());
        assert!(d
            .spec
            .and_then(|s| s.template.spec)
            .and_then(|p| p.topology_spread_constraints)
            .is_none());
    }

    pub(crate) fn config() -> WriterConfig {
        WriterConfig {
            image: "mesh/waypoint:1".into(),
            xds_address: "https://mesh-controller.istio-system:15012".into(),
            root_cert: "-----BEGIN CERTIFICATE-----\n".into(),
            retry: Duration::from_secs(5),
            trust_bundle: None,
        }
    }

    #[test]
    fn everything_is_owned_by_the_gateway() {
        let r = record();
        let deployment = deployment_for(&r, &config());
        let service = service_for(&r);
        let account = service_account_for(&r);
        for meta in [&deployment.metadata, &service.metadata, &account.metadata] {
            let owners = meta.owner_references.as_deref().expect("owner references");
            assert_eq!(owners.len(), 1);
            let owner = &owners[0];
            assert_eq!(owner.api_version, "gateway.networking.k8s.io/v1");
            assert_eq!(owner.kind, "Gateway");
            assert_eq!(owner.name, "waypoint");
            assert_eq!(owner.uid, "uid-1");
            assert_eq!(owner.controller, Some(true));
            assert_eq!(meta.namespace.as_deref(), Some("apps"));
        }
        let local = WaypointDeployment {
            gateway_uid: String::new(),
            ..r
        };
        assert!(owner_reference(&local).is_none());
        assert!(service_for(&local).metadata.owner_references.is_none());
    }

    #[test]
    fn deployment_runs_an_uncaptured_waypoint() {
        let r = record();
        let deployment = deployment_for(&r, &config());
        let spec = deployment.spec.expect("spec");
        let selector = spec.selector.match_labels.expect("selector");
        assert_eq!(selector.get(GATEWAY_NAME_LABEL).map(String::as_str), Some("waypoint"));
        let template_labels = spec.template.metadata.and_then(|m| m.labels).expect("pod labels");
        for (k, v) in &selector {
            assert_eq!(template_labels.get(k), Some(v), "the selector selects the pods");
        }
        assert_eq!(
            template_labels.get(DATAPLANE_MODE_LABEL).map(String::as_str),
            Some("none")
        );
        assert_eq!(
            template_labels.get(MANAGED_LABEL).map(String::as_str),
            Some(MANAGED_VALUE)
        );
        assert_eq!(spec.replicas, None, "left to users and autoscalers");

        let pod = spec.template.spec.expect("pod spec");
        assert_eq!(pod.service_account_name.as_deref(), Some("waypoint"));
        let container = &pod.containers[0];
        assert_eq!(container.image.as_deref(), Some("mesh/waypoint:1"));
        let args = container.args.as_deref().expect("args");
        assert!(args.windows(2).any(|w| w == ["--gateway", "apps/waypoint"]));
        assert!(args.windows(2).any(|w| w[0] == "--identity" && w[1] == r.identity));
        assert!(args
            .windows(2)
            .any(|w| w == ["--trust-bundle", "/var/run/secrets/mesh/root-cert.pem"]));
        assert!(args
            .windows(2)
            .any(|w| w == ["--token-file", "/var/run/secrets/tokens/mesh-token"]));
        // Every flag is one the waypoint binary accepts.
        let mut argv = vec!["waypoint".to_owned()];
        argv.extend(args.iter().cloned());
        if let Err(e) = <waypoint::config::Config as clap::Parser>::try_parse_from(&argv) {
            panic!("the waypoint refuses the generated arguments: {e}");
        }
        let volumes = pod.volumes.as_deref().expect("volumes");
        let token = volumes
            .iter()
            .find_map(|v| v.projected.as_ref())
            .and_then(|p| p.sources.as_ref())
            .and_then(|s| s[0].service_account_token.as_ref())
            .expect("projected token");
        assert_eq!(token.audience.as_deref(), Some(TOKEN_AUDIENCE));
        let ports: Vec<_> = container
            .ports
            .iter()
            .flatten()
            .map(|p| (p.name.as_deref().unwrap_or(""), p.container_port))
            .collect();
        assert_eq!(ports, [("hbone", 15008), ("metrics", 15020)]);
        let probe = container
            .readiness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .expect("readiness probe");
        assert_eq!(probe.path.as_deref(), Some("/healthz/ready"));
        assert_eq!(probe.port, IntOrString::Int(15020));
    }

    #[test]
    fn service_exposes_hbone() {
        let r = record();
        let service = service_for(&r);
        let spec = service.spec.clone().expect("spec");
        assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
        assert_eq!(spec.external_traffic_policy, None);
        assert_eq!(spec.selector, Some(selector_labels(&r)));
        let ports = spec.ports.expect("ports");
        assert_eq!(ports.len(), 1);
        assert_eq!(ports[0].name.as_deref(), Some("mesh"));
        assert_eq!(ports[0].port, 15008);
        assert_eq!(ports[0].target_port, Some(IntOrString::String("hbone".into())));
        // Server-side apply bodies carry their type.
        let body = serde_json::to_value(&service).expect("serializes");
        assert_eq!(body["apiVersion"], "v1");
        assert_eq!(body["kind"], "Service");
        assert!(body.get("status").is_none());
    }

    /// The generated waypoint passes the same pod-security rules the shipped manifests are
    /// checked against (scripts/pod_security.py): no exception needed.
    #[test]
    fn waypoint_container_is_locked_down() {
        let d = deployment_for(&record(), &config());
        let pod = d.spec.and_then(|s| s.template.spec).expect("pod spec");
        let sc = pod.containers[0].security_context.clone().expect("security context");
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.capabilities.and_then(|c| c.drop), Some(vec!["ALL".to_owned()]));
        assert_eq!(sc.seccomp_profile.map(|p| p.type_), Some("RuntimeDefault".to_owned()));
        assert_ne!(pod.host_network, Some(true));
    }

    /// An ingress Gateway runs the same binary with `--role ingress`, uncaptured, on its
    /// listeners' ports behind a LoadBalancer Service, allowed to bind 80 and 443.
    #[test]
    fn an_ingress_gateway_is_deployed_on_its_listener_ports() {
        let r = ingress_record();
        let d = deployment_for(&r, &config());
        let spec = d.spec.expect("spec");
        let labels = spec.template.metadata.and_then(|m| m.labels).expect("pod labels");
        assert_eq!(
            labels[DATAPLANE_MODE_LABEL], "none",
            "the gateway's pod is not captured"
        );
        assert_eq!(labels["team"], "edge", "spec.infrastructure.labels");
        let pod = spec.template.spec.expect("pod spec");
        let args = pod.containers[0].args.clone().expect("args");
        assert!(args.windows(2).any(|w| w == ["--role", "ingress"]));
        assert!(!args.iter().any(|a| a == "--hbone-addr"));
        let mut argv = vec!["waypoint".to_owned()];
        argv.extend(args);
        if let Err(e) = <waypoint::config::Config as clap::Parser>::try_parse_from(&argv) {
            panic!("the waypoint refuses the generated arguments: {e}");
        }
        let ports: Vec<i32> = pod.containers[0]
            .ports
            .iter()
            .flatten()
            .map(|p| p.container_port)
            .collect();
        assert_eq!(ports, [443, 80, 8443, 15020]);
        let sysctls = pod.security_context.and_then(|s| s.sysctls).expect("sysctls");
        assert_eq!(sysctls[0].name, "net.ipv4.ip_unprivileged_port_start");
        assert_eq!(sysctls[0].value, "0");

        let service = service_for(&r);
        let annotations = service.metadata.annotations.clone().expect("annotations");
        assert_eq!(annotations["service.beta.kubernetes.io/aws-load-balancer-type"], "nlb");
        let spec = service.spec.expect("service spec");
        assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
        assert_eq!(spec.external_traffic_policy.as_deref(), Some("Local"));
        let ports: Vec<(String, i32, Option<String>)> = spec
            .ports
            .expect("ports")
            .into_iter()
            .map(|p| (p.name.unwrap_or_default(), p.port, p.app_protocol))
            .collect();
        assert_eq!(
            ports,
            [
                ("https-443".to_owned(), 443, Some("https".to_owned())),
                ("http-80".to_owned(), 80, Some("http".to_owned())),
                ("tls-8443".to_owned(), 8443, Some("tls".to_owned())),
            ]
        );

        // A waypoint's pod needs no sysctl: it binds 15008 only.
        let waypoint = deployment_for(&record(), &config());
        assert!(waypoint
            .spec
            .and_then(|s| s.template.spec)
            .and_then(|p| p.security_context)
            .is_none());
    }
}
