//! The ADS service on the wire, with every resource encoded once per version and shared by
//! all clients' responses: a response carries the resources as their encoded bytes
//! ([`EncodedResponse`], the same bytes on the wire as `DeltaDiscoveryResponse`), so pushing
//! the world to a thousand clients copies pointers, not a thousand encodings. The generated
//! tonic server fixes the response type to the decoded message, so this is the same service
//! (one streaming method, the same path and limits) over tonic's server with that type.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use mesh_proto::discovery::DeltaDiscoveryRequest;
use tonic::codegen::{empty_body, http, Body, BoxFuture, StdError};
use tonic::server::{Grpc, NamedService, StreamingService};
use tonic::{Status, Streaming};

use super::server::{AdsServer, ResponseStream};

/// `envoy.service.discovery.v3.DeltaDiscoveryResponse` with its resources already encoded:
/// field 2 holds each `Resource` message's bytes, which is how an embedded message is
/// written, so clients decode it as the usual response. Only ever encoded here (decoding
/// skips every field).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EncodedResponse {
    pub system_version_info: String,
    pub resources: Resources,
    pub type_url: String,
    pub nonce: String,
    pub removed_resources: Vec<String>,
}

/// A response's resources.
#[derive(Clone, Debug, PartialEq)]
pub enum Resources {
    /// Each resource's encoded `Resource` message.
    Each(Vec<Bytes>),
    /// Field-2 records already framed (tag and length before each resource): the same
    /// chunk of a full push, built once per snapshot for every client that needs all of it.
    Framed(Bytes),
}

impl Default for Resources {
    fn default() -> Self {
        Resources::Each(Vec::new())
    }
}

/// Frames `resources` as field-2 records.
pub fn frame<'a>(resources: impl Iterator<Item = &'a Bytes>) -> Bytes {
    let mut buf = bytes::BytesMut::new();
    for r in resources {
        prost::encoding::bytes::encode(2, r, &mut buf);
    }
    buf.freeze()
}

impl prost::Message for EncodedResponse {
    fn encode_raw(&self, buf: &mut impl bytes::BufMut) {
        use prost::encoding::{bytes as b, string};
        if !self.system_version_info.is_empty() {
            string::encode(1, &self.system_version_info, buf);
        }
        match &self.resources {
            Resources::Each(each) => each.iter().for_each(|r| b::encode(2, r, buf)),
            Resources::Framed(framed) => buf.put_slice(framed),
        }
        if !self.type_url.is_empty() {
            string::encode(4, &self.type_url, buf);
        }
        if !self.nonce.is_empty() {
            string::encode(5, &self.nonce, buf);
        }
        string::encode_repeated(6, &self.removed_resources, buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        use prost::encoding::{bytes as b, string};
        let opt = |tag, s: &String| if s.is_empty() { 0 } else { string::encoded_len(tag, s) };
        let resources = match &self.resources {
            Resources::Each(each) => b::encoded_len_repeated(2, each),
            Resources::Framed(framed) => framed.len(),
        };
        opt(1, &self.system_version_info)
            + resources
            + opt(4, &self.type_url)
            + opt(5, &self.nonce)
            + string::encoded_len_repeated(6, &self.removed_resources)
    }

    fn clear(&mut self) {
        *self = EncodedResponse::default();
    }
}

const SERVICE: &str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
const DELTA: &str = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

/// The ADS gRPC service ([`AdsServer::into_service`]).
#[derive(Clone)]
pub struct AdsService {
    inner: Arc<AdsServer>,
}

impl AdsService {
    pub(super) fn new(server: AdsServer) -> Self {
        AdsService {
            inner: Arc::new(server),
        }
    }
}

impl NamedService for AdsService {
    const NAME: &'static str = SERVICE;
}

struct Delta(Arc<AdsServer>);

impl StreamingService<DeltaDiscoveryRequest> for Delta {
    type Response = EncodedResponse;
    type ResponseStream = ResponseStream;
    type Future = BoxFuture<tonic::Response<ResponseStream>, Status>;

    fn call(&mut self, request: tonic::Request<Streaming<DeltaDiscoveryRequest>>) -> Self::Future {
        let inner = self.0.clone();
        Box::pin(async move { inner.delta_aggregated_resources(request).await })
    }
}

impl<B> tonic::codegen::Service<http::Request<B>> for AdsService
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::BoxBody>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != DELTA {
            return Box::pin(async move {
                let mut response = http::Response::new(empty_body());
                let headers = response.headers_mut();
                headers.insert(Status::GRPC_STATUS, (tonic::Code::Unimplemented as i32).into());
                headers.insert(http::header::CONTENT_TYPE, tonic::metadata::GRPC_CONTENT_TYPE);
                Ok(response)
            });
        }
        let inner = self.inner.clone();
        Box::pin(async move {
            let codec = tonic::codec::ProstCodec::<EncodedResponse, DeltaDiscoveryRequest>::default();
            let mut grpc = Grpc::new(codec).apply_max_message_size_config(Some(16 << 20), Some(64 << 20));
            Ok(grpc.streaming(Delta(inner), req).await)
        })
    }
}

#[cfg(test)]
mod tests {
    use mesh_proto::discovery::{DeltaDiscoveryResponse, Resource};
    use prost::Message;

    use super::*;

    fn resource(name: &str) -> Resource {
        Resource {
            name: name.to_owned(),
            version: "00ff".to_owned(),
            aliases: vec![format!("/10.0.0.{}", name.len())],
            resource: Some(prost_types::Any {
                type_url: "t".to_owned(),
                value: name.as_bytes().to_vec(),
            }),
            ttl: None,
        }
    }

    /// Both forms put the same bytes on the wire as the decoded response would.
    #[test]
    fn encoded_responses_are_delta_discovery_responses() {
        let resources: Vec<Resource> = ["a", "bb", "ccc"].into_iter().map(resource).collect();
        let encoded: Vec<Bytes> = resources.iter().map(|r| Bytes::from(r.encode_to_vec())).collect();
        let expected = DeltaDiscoveryResponse {
            system_version_info: "7".to_owned(),
            resources,
            type_url: "type".to_owned(),
            nonce: "9".to_owned(),
            removed_resources: vec!["gone".to_owned()],
        };
        for form in [
            Resources::Each(encoded.clone()),
            Resources::Framed(frame(encoded.iter())),
        ] {
            let r = EncodedResponse {
                system_version_info: "7".to_owned(),
                resources: form,
                type_url: "type".to_owned(),
                nonce: "9".to_owned(),
                removed_resources: vec!["gone".to_owned()],
            };
            assert_eq!(r.encoded_len(), r.encode_to_vec().len());
            assert_eq!(r.encode_to_vec(), expected.encode_to_vec());
            assert_eq!(
                DeltaDiscoveryResponse::decode(&*r.encode_to_vec()).ok(),
                Some(expected.clone())
            );
        }
    }
}
