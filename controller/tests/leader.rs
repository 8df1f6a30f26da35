//! Two controller replicas' leader-election loops against an API stand-in that holds one
//! Lease in memory and answers only get / create / replace of it, each replica through its
//! own loopback listener so one replica's calls can be stalled on demand. Both replicas'
//! leader flags are sampled every millisecond: at no instant may both be set, and a leader
//! whose calls hang must drop its flag before its lease could expire for the other.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use controller::k8s::leader::{self, LeaderConfig};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::time::Instant;

const LEASE_PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/mesh/leases";
const NAME: &str = "mesh-controller";

/// The one Lease, and when each accepted write happened.
#[derive(Default)]
struct Store {
    lease: Option<Value>,
    version: u64,
    /// (holder, when) of every accepted write.
    writes: Vec<(String, Instant)>,
}

fn status(code: StatusCode, reason: &str) -> Response<Full<Bytes>> {
    let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
        "reason": reason, "code": code.as_u16(), "message": reason});
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = code;
    r
}

fn ok(value: &Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(value.to_string())));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

impl Store {
    fn handle(&mut self, method: &Method, path: &str, body: &[u8]) -> Response<Full<Bytes>> {
        let named = format!("{LEASE_PATH}/{NAME}");
        match (method, path) {
            (&Method::GET, p) if p == named => match &self.lease {
                Some(l) => ok(l),
                None => status(StatusCode::NOT_FOUND, "NotFound"),
            },
            (&Method::POST, LEASE_PATH) if self.lease.is_some() => status(StatusCode::CONFLICT, "AlreadyExists"),
            (&Method::POST, LEASE_PATH) => self.store(body),
            (&Method::PUT, p) if p == named => {
                let Ok(sent) = serde_json::from_slice::<Value>(body) else {
                    return status(StatusCode::BAD_REQUEST, "BadRequest");
                };
                let current = self.lease.as_ref().map(|l| l["metadata"]["resourceVersion"].clone());
                if current != Some(sent["metadata"]["resourceVersion"].clone()) {
                    return status(StatusCode::CONFLICT, "Conflict");
                }
                self.store(body)
            }
            _ => status(StatusCode::NOT_FOUND, "NotFound"),
        }
    }

    fn store(&mut self, body: &[u8]) -> Response<Full<Bytes>> {
        let Ok(mut lease) = serde_json::from_slice::<Value>(body) else {
            return status(StatusCode::BAD_REQUEST, "BadRequest");
        };
        self.version += 1;
        lease["metadata"]["resourceVersion"] = json!(self.version.to_string());
        let holder = lease["spec"]["holderIdentity"].as_str().unwrap_or("").to_owned();
        self.writes.push((holder, Instant::now()));
        self.lease = Some(lease.clone());
        ok(&lease)
    }
}

/// One replica's door to the shared store; `stall` holds every request unanswered (and
/// unapplied) while set.
async fn front(store: Arc<Mutex<Store>>, stall: Arc<AtomicBool>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(mesh_core::admin_http::serve_forever(
        listener,
        move |req: Request<Incoming>| {
            let (store, stall) = (store.clone(), stall.clone());
            async move {
                let (parts, body) = req.into_parts();
                let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                while stall.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                let mut store = store.lock().expect("store");
                store.handle(&parts.method, parts.uri.path(), &body)
            }
        },
    ));
    addr
}

struct Replica {
    leading: watch::Receiver<bool>,
    stall: Arc<AtomicBool>,
}

async fn replica(store: &Arc<Mutex<Store>>, identity: &str) -> Replica {
    let stall = Arc::new(AtomicBool::new(false));
    let addr = front(store.clone(), stall.clone()).await;
    let url = format!("http://{addr}").parse().expect("url");
    let client = kube::Client::try_from(kube::Config::new(url)).expect("client");
    let config = LeaderConfig {
        namespace: "mesh".into(),
        name: NAME.into(),
        identity: identity.into(),
        lease_duration: Duration::from_secs(2),
    };
    let (tx, leading) = watch::channel(false);
    tokio::spawn(leader::run(client, config, tx));
    Replica { leading, stall }
}

/// Samples both flags every millisecond for `span`; panics if both are ever set. Returns
/// when each flag was last seen changing to its final value.
async fn sample(a: &Replica, b: &Replica, span: Duration, log: &mut Vec<(Instant, bool, bool)>) {
    let end = Instant::now() + span;
    while Instant::now() < end {
        let (x, y) = (*a.leading.borrow(), *b.leading.borrow());
        assert!(!(x && y), "both replicas lead at once");
        if log.last().is_none_or(|&(_, px, py)| (px, py) != (x, y)) {
            log.push((Instant::now(), x, y));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_leader_steps_down_before_its_lease_expires_and_never_two_leaders() {
    let lease = Duration::from_secs(2);
    let store = Arc::new(Mutex::new(Store::default()));
    let a = replica(&store, "a").await;
    let b = replica(&store, "b").await;
    let mut log = Vec::new();
    sample(&a, &b, Duration::from_secs(3), &mut log).await;
    let (leader, follower, leader_name) = match (*a.leading.borrow(), *b.leading.borrow()) {
        (true, false) => (&a, &b, "a"),
        (false, true) => (&b, &a, "b"),
        other => panic!("expected exactly one leader, got {other:?}"),
    };

    // The leader's API calls hang from now on (not applied, never answered).
    leader.stall.store(true, Ordering::SeqCst);
    let stalled_at = Instant::now();
    sample(&a, &b, lease * 3, &mut log).await;
    let last_write = {
        let s = store.lock().expect("store");
        s.writes
            .iter()
            .rev()
            .find(|(h, _)| h == leader_name)
            .map(|&(_, at)| at)
            .expect("the leader wrote")
    };
    let stepped_down = log
        .iter()
        .find(|&&(at, x, y)| at > stalled_at && !(if leader_name == "a" { x } else { y }))
        .map(|&(at, ..)| at)
        .expect("the stalled leader stepped down");
    let took_over = log
        .iter()
        .find(|&&(at, x, y)| at > stalled_at && (if leader_name == "a" { y } else { x }))
        .map(|&(at, ..)| at)
        .expect("the other replica took over");
    eprintln!(
        "stepped down {:?} after its last write, {:?} after the stall; the other took over {:?} after that write",
        stepped_down - last_write,
        stepped_down - stalled_at,
        took_over - last_write,
    );
    assert!(
        stepped_down < last_write + lease,
        "the stalled leader must stop writing before its lease can expire for others"
    );
    assert!(stepped_down < took_over);
    assert!(*follower.leading.borrow());

    // The old leader's calls go through again: it sees the new holder and stays a follower.
    leader.stall.store(false, Ordering::SeqCst);
    sample(&a, &b, lease * 2, &mut log).await;
    assert!(!*leader.leading.borrow());
    assert!(*follower.leading.borrow());
}
