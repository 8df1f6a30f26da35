//! Whose traffic a proxy carries. A dedicated-mode proxy serves every workload at its
//! namespace's addresses. An in-pod proxy serves one pod: the one the node agent named when it
//! handed the namespace over. Finding the workload by address alone would let a pod that adds
//! another pod's IP inside its own namespace (`ip addr add <victim> dev lo`, with NET_ADMIN)
//! present the victim's identity, and would let a new pod act as the former owner of a reused
//! IP while xDS still names that owner. Istio's ztunnel binds an in-pod proxy to the ZDS
//! workload in the same way.

use mesh_core::state::Workload;
use mesh_proto::workload::zds;

/// Whose traffic a proxy carries.
#[derive(Clone, Debug, Default)]
pub enum Owner {
    /// Any workload at the namespace's addresses (dedicated mode).
    #[default]
    Namespace,
    /// One pod, as the node agent's `AddWorkload` named it.
    Pod(Pod),
}

/// The pod the node agent handed a namespace over for.
#[derive(Clone, Debug)]
pub struct Pod {
    /// The workload uid (our node agent sends the xDS workload's; Istio's sends the
    /// Kubernetes pod UID, so then only `info` identifies the pod).
    pub uid: String,
    pub info: Option<zds::WorkloadInfo>,
}

impl Owner {
    /// Whether `w`, found at one of this namespace's addresses, is the workload served here.
    /// With the agent's workload info, its name, namespace and (when given) service account
    /// must match; without it, the uid.
    pub fn owns(&self, w: &Workload) -> bool {
        let Owner::Pod(pod) = self else { return true };
        match &pod.info {
            Some(info) => {
                w.name == info.name
                    && w.namespace == info.namespace
                    && (info.service_account.is_empty() || w.identity.service_account == info.service_account)
            }
            None => w.uid == pod.uid,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a panic in a test is a failed test

    use super::*;

    fn workload(uid: &str, name: &str, namespace: &str, sa: &str) -> Workload {
        Workload {
            uid: uid.into(),
            name: name.into(),
            namespace: namespace.into(),
            addresses: vec![std::net::Ipv4Addr::new(10, 0, 0, 1).into()],
            network: String::new(),
            tunnel: mesh_core::state::Tunnel::Hbone,
            identity: mesh_core::identity::Identity::new("cluster.local", namespace, sa).unwrap(),
            waypoint: None,
            node: "n".into(),
            canonical_name: name.into(),
            canonical_revision: "v1".into(),
            workload_name: name.into(),
            services: vec![],
            authorization_policies: vec![],
            healthy: true,
            cluster_id: "c".into(),
        }
    }

    #[test]
    fn an_in_pod_proxy_owns_only_the_pod_it_was_handed() {
        let victim = workload("c//Pod/shop/pay", "pay", "shop", "pay");
        let own = workload("c//Pod/evil/x", "x", "evil", "x");
        let info = |name: &str, ns: &str, sa: &str| zds::WorkloadInfo {
            name: name.into(),
            namespace: ns.into(),
            service_account: sa.into(),
        };
        let by_info = Owner::Pod(Pod {
            uid: "k8s-uid-1".into(),
            info: Some(info("x", "evil", "x")),
        });
        let by_uid = Owner::Pod(Pod {
            uid: "c//Pod/evil/x".into(),
            info: None,
        });
        let cases = [
            (&Owner::Namespace, &victim, true),
            (&by_info, &own, true),
            (&by_info, &victim, false),
            (&by_uid, &own, true),
            (&by_uid, &victim, false),
        ];
        for (i, (owner, w, want)) in cases.into_iter().enumerate() {
            assert_eq!(owner.owns(w), want, "case {i}");
        }
        let other_sa = Owner::Pod(Pod {
            uid: String::new(),
            info: Some(info("x", "evil", "other")),
        });
        assert!(!other_sa.owns(&own), "the service account must match when given");
    }
}
