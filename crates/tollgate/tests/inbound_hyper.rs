//! The inbound layer on a plain hyper server (no axum): the peer address comes from the
//! `PeerAddr` extension the accept loop inserts.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tollgate::core::Quota;
use tollgate::http::TrustedProxies;
use tollgate::inbound::{ClientIp, PeerAddr, Policy, RateLimitLayer};
use tower::{Layer, ServiceExt, service_fn};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_hyper_server() {
    let policy = Policy::builder()
        .tier("anonymous", Quota::per_hour(3).unwrap())
        .build()
        .unwrap();
    let layer = RateLimitLayer::builder(policy, ClientIp::new("anonymous", TrustedProxies::none()))
        .build()
        .expect("a valid layer");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                return;
            };
            let hello = service_fn(|_req: Request<Incoming>| async {
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"hello"))))
            });
            // Tell the layer who is calling, then hand the request on.
            let service = layer
                .layer(hello)
                .map_request(move |mut req: Request<Incoming>| {
                    req.extensions_mut().insert(PeerAddr(peer));
                    req
                });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service))
                    .await;
            });
        }
    });
    let client = reqwest::Client::new();
    let url = format!("http://{addr}/");
    let mut statuses = Vec::new();
    let mut remaining = Vec::new();
    for _ in 0..4 {
        let r = client.get(&url).send().await.unwrap();
        statuses.push(r.status().as_u16());
        remaining.push(
            r.headers()["x-ratelimit-remaining"]
                .to_str()
                .unwrap()
                .to_owned(),
        );
    }
    assert_eq!(statuses, [200, 200, 200, 429]);
    assert_eq!(remaining, ["2", "1", "0", "0"]);
    server.abort();
    let _: SocketAddr = addr;
}
