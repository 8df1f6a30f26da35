//! The ADS service on the wire, with every resource encoded once per version and shared by
//! all clients' responses: a response carries the resources as their encoded bytes
//! ([`EncodedResponse`], the same bytes on the wire as `DeltaDiscoveryResponse`), so pushing
//! the world to a thousand clients copies pointers, not a thousand encodings. The response
//! body is written here ([`GrpcBody`]) rather than by tonic's codec, which would copy every
//! response into its own buffer: a full push's chunks go to HTTP/2 as the snapshot's own
//! bytes (one clone of a `Bytes` per chunk, no copy per client). Requests are still decoded
//! by tonic, with the same path and limits as the generated server.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use hyper::body::Frame;
use mesh_proto::discovery::DeltaDiscoveryRequest;
use prost::Message;
use tonic::codec::Codec;
use tonic::codegen::{empty_body, http, Body, BoxFuture, StdError};
use tonic::server::NamedService;
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

impl EncodedResponse {
    /// The fields before the resources.
    fn encode_head(&self, buf: &mut impl BufMut) {
        if !self.system_version_info.is_empty() {
            prost::encoding::string::encode(1, &self.system_version_info, buf);
        }
    }

    /// The fields after the resources.
    fn encode_tail(&self, buf: &mut impl BufMut) {
        use prost::encoding::string;
        if !self.type_url.is_empty() {
            string::encode(4, &self.type_url, buf);
        }
        if !self.nonce.is_empty() {
            string::encode(5, &self.nonce, buf);
        }
        string::encode_repeated(6, &self.removed_resources, buf);
    }

    /// The response as one gRPC message (flag byte, length, message) in pieces to write in
    /// order: framed resources are their own piece, shared with the snapshot, not copied.
    /// Fails (with the length) for a message over [`MAX_RESPONSE`].
    fn grpc_pieces(&self) -> Result<Vec<Bytes>, usize> {
        let len = self.encoded_len();
        let Some(prefix) = u32::try_from(len).ok().filter(|_| len <= MAX_RESPONSE) else {
            return Err(len);
        };
        let framed = match &self.resources {
            Resources::Framed(framed) if !framed.is_empty() => framed,
            _ => {
                let mut whole = BytesMut::with_capacity(GRPC_PREFIX + len);
                whole.put_u8(0);
                whole.put_u32(prefix);
                self.encode_raw(&mut whole);
                return Ok(vec![whole.freeze()]);
            }
        };
        let mut head = BytesMut::with_capacity(GRPC_PREFIX + 16);
        head.put_u8(0);
        head.put_u32(prefix);
        self.encode_head(&mut head);
        let mut tail = BytesMut::new();
        self.encode_tail(&mut tail);
        Ok(vec![head.freeze(), framed.clone(), tail.freeze()])
    }
}

impl prost::Message for EncodedResponse {
    fn encode_raw(&self, buf: &mut impl bytes::BufMut) {
        self.encode_head(buf);
        match &self.resources {
            Resources::Each(each) => each.iter().for_each(|r| prost::encoding::bytes::encode(2, r, buf)),
            Resources::Framed(framed) => buf.put_slice(framed),
        }
        self.encode_tail(buf);
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

/// Largest response message (requests: [`MAX_REQUEST`]); a response holds at most a chunk
/// of resources, far less.
const MAX_RESPONSE: usize = 64 << 20;
/// Largest request message.
const MAX_REQUEST: usize = 16 << 20;
/// A gRPC message's prefix: compression flag and length.
const GRPC_PREFIX: usize = 5;

/// A stream of responses as a gRPC response body: each response's pieces as data frames,
/// then the status as trailers (`grpc-status: 0` when the stream ends, the error's when it
/// fails), as tonic's codec writes them, without copying the shared pieces.
pub(super) struct GrpcBody {
    responses: ResponseStream,
    /// Pieces of the current response not yet taken.
    pending: VecDeque<Bytes>,
    done: bool,
}

impl GrpcBody {
    pub(super) fn new(responses: ResponseStream) -> Self {
        GrpcBody {
            responses,
            pending: VecDeque::new(),
            done: false,
        }
    }

    /// The last frame: the status as trailers.
    fn finish(&mut self, status: &Status) -> Frame<Bytes> {
        self.done = true;
        self.pending.clear();
        let mut trailers = http::HeaderMap::new();
        if status.add_header(&mut trailers).is_err() {
            // A message that cannot be a header value: the code alone.
            let _ = Status::new(status.code(), "").add_header(&mut trailers);
        }
        Frame::trailers(trailers)
    }
}

impl Body for GrpcBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        loop {
            if let Some(piece) = this.pending.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(piece))));
            }
            if this.done {
                return Poll::Ready(None);
            }
            let status = match ready!(this.responses.as_mut().poll_next(cx)) {
                Some(Ok(response)) => match response.grpc_pieces() {
                    Ok(pieces) => {
                        this.pending.extend(pieces.into_iter().filter(|p| !p.is_empty()));
                        continue;
                    }
                    Err(len) => Status::out_of_range(format!("response of {len} bytes over {MAX_RESPONSE}")),
                },
                Some(Err(status)) => status,
                None => Status::new(tonic::Code::Ok, ""),
            };
            return Poll::Ready(Some(Ok(this.finish(&status))));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.pending.is_empty()
    }
}

/// Serves one Delta ADS call: requests decoded by tonic, responses written by [`GrpcBody`].
async fn delta<B>(server: Arc<AdsServer>, req: http::Request<B>) -> http::Response<tonic::body::BoxBody>
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    let decoder = tonic::codec::ProstCodec::<EncodedResponse, DeltaDiscoveryRequest>::default().decoder();
    let request = req.map(|body| Streaming::new_request(decoder, body, None, Some(MAX_REQUEST)));
    match server
        .delta_aggregated_resources(tonic::Request::from_http(request))
        .await
    {
        Ok(response) => {
            let (metadata, responses, extensions) = response.into_parts();
            let mut http = http::Response::new(tonic::body::boxed(GrpcBody::new(responses)));
            *http.headers_mut() = metadata.into_headers();
            http.headers_mut()
                .insert(http::header::CONTENT_TYPE, tonic::metadata::GRPC_CONTENT_TYPE);
            *http.extensions_mut() = extensions;
            http
        }
        Err(status) => status.into_http(),
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
        Box::pin(async move { Ok(delta(inner, req).await) })
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

    /// The messages of a gRPC body (prefix checked) and its trailers.
    async fn read_body(mut body: GrpcBody, shared: &Bytes) -> (Vec<DeltaDiscoveryResponse>, http::HeaderMap, bool) {
        use http_body_util::BodyExt;
        let (mut data, mut trailers, mut zero_copy) = (Vec::new(), http::HeaderMap::new(), false);
        while let Some(frame) = body.frame().await {
            match frame.map(Frame::into_data) {
                Ok(Ok(piece)) => {
                    zero_copy |= piece.as_ptr() == shared.as_ptr();
                    data.extend_from_slice(&piece);
                }
                Ok(Err(frame)) => trailers = frame.into_trailers().unwrap_or_default(),
                Err(status) => panic!("body error {status}"),
            }
        }
        assert!(body.is_end_stream());
        let mut messages = Vec::new();
        let mut rest = &data[..];
        while !rest.is_empty() {
            assert_eq!(rest[0], 0, "uncompressed");
            let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
            messages.push(DeltaDiscoveryResponse::decode(&rest[GRPC_PREFIX..GRPC_PREFIX + len]).unwrap());
            rest = &rest[GRPC_PREFIX + len..];
        }
        (messages, trailers, zero_copy)
    }

    /// The body writes each response as a gRPC message, a full push's framed resources as
    /// the very bytes the snapshot holds (no copy per client), then the status as trailers:
    /// OK when the stream ends, the error's code and message when it fails.
    #[tokio::test]
    async fn body_is_grpc_messages_sharing_the_framed_bytes_then_the_status() {
        let resources: Vec<Resource> = ["a", "bb", "ccc"].into_iter().map(resource).collect();
        let encoded: Vec<Bytes> = resources.iter().map(|r| Bytes::from(r.encode_to_vec())).collect();
        let framed = frame(encoded.iter());
        let response = |resources, nonce: &str| EncodedResponse {
            system_version_info: "7".to_owned(),
            resources,
            type_url: "type".to_owned(),
            nonce: nonce.to_owned(),
            removed_resources: vec!["gone".to_owned()],
        };
        let expected = |nonce: &str| DeltaDiscoveryResponse {
            system_version_info: "7".to_owned(),
            resources: resources.clone(),
            type_url: "type".to_owned(),
            nonce: nonce.to_owned(),
            removed_resources: vec!["gone".to_owned()],
        };
        let ok = vec![
            Ok(response(Resources::Framed(framed.clone()), "1")),
            Ok(response(Resources::Each(encoded.clone()), "2")),
        ];
        let body = GrpcBody::new(Box::pin(futures_util::stream::iter(ok)));
        let (messages, trailers, zero_copy) = read_body(body, &framed).await;
        assert_eq!(messages, vec![expected("1"), expected("2")]);
        assert!(zero_copy, "the framed resources were copied");
        assert_eq!(trailers.get("grpc-status").map(|v| v.as_bytes()), Some(&b"0"[..]));

        let failed = vec![
            Ok(response(Resources::Framed(framed.clone()), "3")),
            Err(Status::resource_exhausted("too many names")),
            Ok(response(Resources::Framed(framed.clone()), "4")),
        ];
        let body = GrpcBody::new(Box::pin(futures_util::stream::iter(failed)));
        let (messages, trailers, _) = read_body(body, &framed).await;
        assert_eq!(messages, vec![expected("3")], "nothing after the error");
        assert_eq!(trailers.get("grpc-status").map(|v| v.as_bytes()), Some(&b"8"[..]));
        assert_eq!(
            trailers.get("grpc-message").map(|v| v.as_bytes()),
            Some(&b"too%20many%20names"[..])
        );
    }
}
