//! The built-in key extractors: API keys, header keys, client addresses.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use super::*;

fn now<F: Future>(f: F) -> F::Output {
    match pin!(f).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("ready futures only"),
    }
}

fn keys() -> ApiKeys {
    ApiKeys::new(
        [(
            "key-alice".to_owned(),
            ApiKeyEntry {
                user: "alice".into(),
                tier: "basic".into(),
            },
        )],
        ClientIp::new("anonymous", TrustedProxies::none()),
    )
}

fn request(headers: &[(&str, &[u8])]) -> Request<()> {
    let mut req = Request::new(());
    for (name, value) in headers {
        req.headers_mut().append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            http::HeaderValue::from_bytes(value).unwrap(),
        );
    }
    req.extensions_mut()
        .insert(PeerAddr("203.0.113.9:5555".parse().unwrap()));
    req
}

#[test]
fn api_keys() {
    let k = keys();
    let alice = now(k.extract(&request(&[("x-api-key", b"key-alice")]))).unwrap();
    assert_eq!((alice.key.as_str(), &*alice.tier), ("user:alice", "basic"));
    let bearer = now(k.extract(&request(&[("authorization", b"Bearer key-alice")]))).unwrap();
    assert_eq!(bearer, alice);
    let anon = now(k.extract(&request(&[]))).unwrap();
    assert_eq!(
        (anon.key.as_str(), &*anon.tier),
        ("ip:203.0.113.9", "anonymous")
    );
    for bad in [&b"nope"[..], b"\xff\xfe", &[b'a'; 65_536]] {
        assert!(matches!(
            now(k.extract(&request(&[("x-api-key", bad)]))),
            Err(Rejection::Unauthorized { .. })
        ));
    }
    // A bearer scheme without a token is an unknown key, not anonymous.
    for empty in [&b"Bearer"[..], b"bearer \t"] {
        assert!(matches!(
            now(k.extract(&request(&[("authorization", empty)]))),
            Err(Rejection::Unauthorized { .. })
        ));
    }
    // Basic auth (or a scheme that only starts like `Bearer`) is not an API key: anonymous.
    let other = now(k.extract(&request(&[("authorization", b"Bearerkey-alice")]))).unwrap();
    assert_eq!(&*other.tier, "anonymous");
    let basic = now(k.extract(&request(&[("authorization", b"Basic Zm9v")]))).unwrap();
    assert_eq!(&*basic.tier, "anonymous");
}

#[test]
fn header_keys_are_bounded() {
    let k = HeaderValueKey::new(
        HeaderName::from_static("x-user"),
        ClientIp::new("basic", TrustedProxies::none()),
    );
    let long = vec![b'x'; 65_536];
    let id = now(k.extract(&request(&[("x-user", &long)]))).unwrap();
    assert!(id.key.len() <= crate::http::key::MAX_KEY_LEN);
    let id = now(k.extract(&request(&[("x-user", b"\xff")]))).unwrap();
    assert_eq!(id.key, "header#ff");
}

#[test]
fn header_keys_keep_every_byte() {
    let k = HeaderValueKey::new(
        HeaderName::from_static("x-user"),
        ClientIp::new("basic", TrustedProxies::none()),
    );
    let key = |value: &[u8]| now(k.extract(&request(&[("x-user", value)]))).unwrap().key;
    // Lossy decoding made these three one key (U+FFFD each).
    let values: [&[u8]; 5] = [b"a\xffb", b"a\xfeb", "a\u{FFFD}b".as_bytes(), b"a", b"61"];
    let keys: std::collections::HashSet<String> = values.iter().map(|v| key(v)).collect();
    assert_eq!(keys.len(), values.len(), "{keys:?}");
    assert_eq!(key(b"a\xffb"), "header#61ff62");
    assert_eq!(key("caf\u{e9}".as_bytes()), "header:caf\u{e9}");
}

#[test]
fn more_than_one_credential_is_refused() {
    let k = keys();
    let two: [&[(&str, &[u8])]; 3] = [
        &[("x-api-key", b"key-alice"), ("x-api-key", b"key-alice")],
        &[("x-api-key", b"nope"), ("x-api-key", b"key-alice")],
        &[
            ("x-api-key", b"key-alice"),
            ("authorization", b"Bearer key-alice"),
        ],
    ];
    for headers in two {
        assert!(
            matches!(
                now(k.extract(&request(headers))),
                Err(Rejection::BadRequest { .. })
            ),
            "{headers:?}"
        );
    }
    // A Basic credential beside an API key is not a second API key.
    let one = now(k.extract(&request(&[
        ("x-api-key", b"key-alice"),
        ("authorization", b"Basic Zm9v"),
    ])))
    .unwrap();
    assert_eq!(one.key, "user:alice");
    // An empty header is a credential presented and not known.
    assert!(matches!(
        now(k.extract(&request(&[("x-api-key", b"")]))),
        Err(Rejection::Unauthorized { .. })
    ));
}

#[test]
fn a_request_without_a_peer_address_is_not_guessed_at() {
    let ip = ClientIp::new("anonymous", TrustedProxies::none());
    let bare = Request::new(());
    match now(KeyExtractor::<()>::extract(&ip, &bare)) {
        Err(Rejection::Misconfigured { reason, detail }) => {
            assert_eq!(reason, "no_peer_address");
            assert!(
                detail.contains("into_make_service_with_connect_info"),
                "{detail}"
            );
        }
        other => panic!("{other:?}"),
    }
    // Unless a shared key was chosen for such requests.
    let shared = ip.fallback_key("ip:unknown");
    let id = now(KeyExtractor::<()>::extract(&shared, &bare)).unwrap();
    assert_eq!((id.key.as_str(), &*id.tier), ("ip:unknown", "anonymous"));
}

/// A plan's key buffer, given back, is the next key's on the same thread: emptied, so the next
/// key is its own and nothing else; one too large to keep is let go.
#[test]
fn a_key_buffer_given_back_is_reused_empty() {
    let first = Identity::new("user:alice-with-a-long-name", "pro");
    let (ptr, capacity) = (first.key.as_ptr(), first.key.capacity());
    give_back(first.key);
    let second = Identity::new("user:bob", "pro");
    assert_eq!(second.key, "user:bob");
    assert_eq!(second.key.as_ptr(), ptr, "the buffer given back");
    assert_eq!(second.key.capacity(), capacity);
    // Too small for the next key: a new buffer.
    give_back(second.key);
    let long = "x".repeat(60);
    let third = Identity::new(&long, "pro");
    assert_eq!(third.key, long);
    assert_ne!(third.key.as_ptr(), ptr);
    // Too large to keep: not reused.
    give_back(String::with_capacity(MAX_SPARE + 1));
    let fourth = Identity::new("user:carol", "pro");
    assert!(fourth.key.capacity() <= MAX_SPARE);
    assert_eq!(fourth.key, "user:carol");
}
