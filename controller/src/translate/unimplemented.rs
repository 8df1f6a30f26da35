//! Reports every field of an Istio spec the mesh does not implement, one problem per field
//! naming its path (`spec.http[0].corsPolicy is not implemented; ignored`). The model lists
//! them while parsing ([`crate::model::istio`]); the CRDs keep them on the object, so nothing
//! a user wrote disappears unseen. An AuthorizationPolicy with such a field also fails closed
//! (its `invalid` reason, reported by authorization translation, does not repeat the paths).

use super::Report;
use crate::model::{Inputs, Kind, ObjectKey};

/// How a report of a field the mesh does not implement ends (`meshctl analyze` keys its
/// fixes on these): in most kinds the field is ignored; in an AuthorizationPolicy it fails
/// closed.
pub const IGNORED: &str = "is not implemented; ignored";
pub const FAILS_CLOSED: &str = "is not implemented; the policy fails closed until it is removed";

pub(crate) fn report(inputs: &Inputs, report: &mut Report) {
    let mut each = |kind: Kind, key: &ObjectKey, paths: &[String], what: &str| {
        for path in paths {
            report.add(kind, key, format!("{path} {what}"));
        }
    };
    for (key, o) in &inputs.authorization_policies {
        each(Kind::AuthorizationPolicy, key, &o.unimplemented, FAILS_CLOSED);
    }
    for (key, o) in &inputs.peer_authentications {
        each(Kind::PeerAuthentication, key, &o.unimplemented, IGNORED);
    }
    for (key, o) in &inputs.request_authentications {
        each(Kind::RequestAuthentication, key, &o.unimplemented, IGNORED);
    }
    for (key, o) in &inputs.virtual_services {
        each(Kind::VirtualService, key, &o.unimplemented, IGNORED);
    }
    for (key, o) in &inputs.destination_rules {
        each(Kind::DestinationRule, key, &o.unimplemented, IGNORED);
    }
    for (key, o) in &inputs.service_entries {
        each(Kind::ServiceEntry, key, &o.unimplemented, IGNORED);
    }
    for (key, o) in &inputs.workload_entries {
        each(Kind::WorkloadEntry, key, &o.unimplemented, IGNORED);
    }
    for (key, o) in &inputs.workload_groups {
        each(Kind::WorkloadGroup, key, &o.unimplemented, IGNORED);
    }
}
