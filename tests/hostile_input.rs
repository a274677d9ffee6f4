//! Hostile input on both ports of a real `keel` node.
//!
//! What `tests/peer_security.rs` already shows is not repeated here (client,
//! admin and certificate-less connections refused on the peer port, a node
//! claiming another node's id, the wrong cluster name, the API's 401 without
//! a certificate and 403 for a client on `/admin/state-hash`). This file adds:
//!
//! - TLS: a certificate of another CA, an expired certificate of the right
//!   CA, plaintext HTTP/1.1 and HTTP/2, and TLS 1.0 / 1.1 ClientHellos, each
//!   refused on the API port and on the peer port;
//! - the API: every admin call refused to a client certificate (403) and to
//!   no certificate (401), with nothing changed; oversized, malformed and
//!   mistyped bodies answered with the one JSON error shape, nothing written,
//!   the node still serving;
//! - the peer port, from a valid node certificate: random bytes on every
//!   route, absurd declared lengths, a body over the message limit, a
//!   malformed append stream and a deeply nested transaction (which used to
//!   overflow the decoder's stack and kill the node) — each an error answer,
//!   no node dies, the cluster keeps serving writes;
//! - HTTP/2 rapid reset floods (CVE-2023-44487) on both ports: the node keeps
//!   serving and its resident memory stays bounded.
//!
//! Every loop is bounded in count and time; waits poll conditions.

mod common;

use std::io::Read;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use bytes::Bytes;
use common::TestCluster;
use http_body_util::BodyExt;
use http_body_util::Full;
use hyper_util::rt::TokioExecutor;
use hyper_util::rt::TokioIo;
use keel::cert::CertOptions;
use keel_raft::tls::TlsFiles;
use keel_raft::tls::TlsMaterial;
use keel_raft::wire;
use keel_storage::model::Command;
use keel_storage::model::Request;
use keel_storage::model::Txn;
use serde_json::Value;
use serde_json::json;

/// A certificate that expired nine days ago (valid for one day, ten days back).
const EXPIRED: CertOptions = CertOptions {
    days: 1,
    not_before_offset_days: -10,
};

/// The alerts that refuse a certificate of another CA.
const FOREIGN: &[&str] = &["DecryptError", "UnknownCA", "BadCertificate"];
/// The alert that refuses an expired certificate.
const EXPIRED_ALERT: &[&str] = &["CertificateExpired"];

/// A client TLS config that trusts the CA in `ca_dir` and presents
/// `<stem>.pem` from `cert_dir`, offering HTTP/2 only.
fn tls(ca_dir: &Path, cert_dir: &Path, stem: &str) -> Arc<rustls::ClientConfig> {
    TlsMaterial::load(&TlsFiles {
        ca: ca_dir.join("ca.pem"),
        cert: cert_dir.join(format!("{stem}.pem")),
        key: cert_dir.join(format!("{stem}-key.pem")),
    })
    .unwrap()
    .client_config(true)
    .unwrap()
}

/// One HTTP/2 request over TLS; the status and the whole response body, or
/// what stopped the exchange. Bounded by `limit`.
async fn h2_call(
    addr: &str,
    cfg: Arc<rustls::ClientConfig>,
    req: hyper::Request<Full<Bytes>>,
    limit: Duration,
) -> Result<(u16, Bytes), String> {
    let fut = async {
        let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let s = tokio_rustls::TlsConnector::from(cfg)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("tls: {e}"))?;
        let (mut send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(s))
            .await
            .map_err(|e| format!("h2: {e}"))?;
        tokio::spawn(conn);
        let resp = send.send_request(req).await.map_err(|e| format!("request: {e:?}"))?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| format!("no answer within {limit:?}"))?
}

fn get(addr: &str, path: &str) -> hyper::Request<Full<Bytes>> {
    hyper::Request::get(format!("https://{addr}{path}"))
        .body(Full::default())
        .unwrap()
}

/// A peer request as node `from` of cluster `cluster` would send it.
fn peer_req(addr: &str, cluster: &str, from: u64, path: &str, body: Bytes) -> hyper::Request<Full<Bytes>> {
    hyper::Request::post(format!("https://{addr}{path}"))
        .header(wire::HDR_CLUSTER, cluster)
        .header(wire::HDR_FROM, from.to_string())
        .header("content-type", wire::CONTENT_TYPE)
        .body(Full::new(body))
        .unwrap()
}

/// Writes `bytes` on a fresh TCP connection and returns what the server
/// sends back (up to the first 7 bytes, enough for a TLS record header and
/// an alert) and whether it closed the connection.
fn raw_exchange(addr: &str, bytes: &[u8]) -> (Vec<u8>, bool) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(bytes).unwrap();
    let (mut got, mut buf) = (Vec::new(), [0u8; 4096]);
    let closed = loop {
        match s.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(_) => break false, // timed out: still open
        }
        if got.len() >= 7 && got[0] == 0x16 {
            break false; // a handshake record: the server is talking TLS with us
        }
    };
    (got, closed)
}

/// A ClientHello record written by hand, offering `version` as its legacy
/// version and no supported_versions extension (so it offers exactly that
/// version), with cipher suites of TLS 1.0-1.2 and the extensions a TLS 1.2
/// server needs for an ECDSA certificate. With 0x0303 it is an acceptable
/// TLS 1.2 hello: the control that proves the bytes are well formed.
fn client_hello(version: u16) -> Vec<u8> {
    let mut body = version.to_be_bytes().to_vec();
    body.extend_from_slice(&[0x5a; 32]); // random
    body.push(0); // no session id
    let suites: [u16; 7] = [0xc02b, 0xc02f, 0xc009, 0xc013, 0x002f, 0x0035, 0x000a];
    body.extend_from_slice(&(2 * suites.len() as u16).to_be_bytes());
    for s in suites {
        body.extend_from_slice(&s.to_be_bytes());
    }
    body.extend_from_slice(&[1, 0]); // compression: null only
    let ext: &[u8] = &[
        0x00, 0x0a, 0x00, 0x06, 0x00, 0x04, 0x00, 0x1d, 0x00, 0x17, // supported_groups: x25519, P-256
        0x00, 0x0b, 0x00, 0x02, 0x01, 0x00, // ec_point_formats: uncompressed
        0x00, 0x0d, 0x00, 0x08, 0x00, 0x06, 0x04, 0x03, 0x08, 0x04, 0x04, 0x01, // signature_algorithms
    ];
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(ext);
    let mut hs = vec![0x01]; // handshake type client_hello, 24-bit length
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend(body);
    let mut rec = vec![0x16, 0x03, 0x01]; // handshake record
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend(hs);
    rec
}

/// Completes the client side of a TLS handshake, sends the HTTP/2 preface
/// and returns how the server answered: with TLS 1.3 the server checks the
/// client certificate after the client considers the handshake done, so its
/// refusal is an alert on the first read ("received fatal alert: ...").
async fn tls_refusal(addr: &str, cfg: Arc<rustls::ClientConfig>) -> String {
    use tokio::io::AsyncReadExt;
    use tokio::io::AsyncWriteExt;
    let fut = async {
        let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut s = tokio_rustls::TlsConnector::from(cfg)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .map_err(|e| format!("write: {e}"))?;
        s.flush().await.map_err(|e| format!("flush: {e}"))?;
        let mut buf = [0u8; 64];
        match s.read(&mut buf).await {
            Ok(0) => Err("closed without an alert".to_string()),
            Ok(n) => Ok(format!("the server answered {n} bytes")),
            Err(e) => Err(format!("read: {e}")),
        }
    };
    match tokio::time::timeout(Duration::from_secs(20), fut).await {
        Ok(Ok(answered)) => answered,
        Ok(Err(refused)) => refused,
        Err(_) => "no answer within 20 s".to_string(),
    }
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_ports_refuse_foreign_expired_plaintext_and_old_tls() {
    let c = TestCluster::start(1);
    c.wait_leader().await;
    let (api, peer) = (c.nodes[&1].api_addr.clone(), c.nodes[&1].raft_addr.clone());
    let certs = c.certs.clone();
    let other = c.root.path().join("other-ca");
    keel::cert::create_dev_set(&other, &[1, 7]).unwrap();
    keel::cert::create_node(&certs, 7, &[], &CertOptions::default(), false).unwrap();
    keel::cert::create_node(&certs, 8, &[], &EXPIRED, false).unwrap();
    keel::cert::create_client(&certs, "expired", false, &EXPIRED, false).unwrap();
    keel::cert::create_client(&certs, "old-admin", true, &EXPIRED, false).unwrap();
    let vote = |from: u64| peer_req(&peer, &c.cluster_name, from, wire::PATH_VOTE, Bytes::from_static(b"x"));
    let limit = Duration::from_secs(20);

    // Controls: the same calls with good certificates are served, so a
    // refusal below is the certificate's doing, not the test's.
    let ok = h2_call(&api, tls(&certs, &certs, "client-dev"), get(&api, "/status"), limit).await;
    assert_eq!(ok.map(|r| r.0), Ok(200), "control: client certificate on the API port");
    let ok = h2_call(&peer, tls(&certs, &certs, "node-7"), vote(7), limit).await;
    assert_eq!(
        ok.map(|r| r.0),
        Ok(400),
        "control: node certificate on the peer port (garbage vote)"
    );

    // Certificates of another CA, and expired ones of the right CA: the
    // server ends the handshake with a TLS alert, and a request never gets
    // an answer. Every keel CA has the same subject, so the verifier finds
    // our CA as the issuer of a foreign certificate and its signature check
    // fails (decrypt_error); an unknown_ca alert would be as good.
    for (port, addr, stem, dir, alert, req) in [
        ("API", &api, "client-dev", &other, FOREIGN, get(&api, "/status")),
        (
            "API",
            &api,
            "admin-dev",
            &other,
            FOREIGN,
            get(&api, "/admin/state-hash"),
        ),
        (
            "API",
            &api,
            "client-expired",
            &certs,
            EXPIRED_ALERT,
            get(&api, "/status"),
        ),
        (
            "API",
            &api,
            "admin-old-admin",
            &certs,
            EXPIRED_ALERT,
            get(&api, "/admin/state-hash"),
        ),
        ("API", &api, "node-8", &certs, EXPIRED_ALERT, get(&api, "/status")),
        ("peer", &peer, "node-7", &other, FOREIGN, vote(7)),
        ("peer", &peer, "node-8", &certs, EXPIRED_ALERT, vote(8)),
    ] {
        let cfg = tls(&certs, dir, stem);
        let refusal = tls_refusal(addr, cfg.clone()).await;
        eprintln!("{port} port, {stem}: {refusal}");
        assert!(
            alert
                .iter()
                .any(|a| refusal.contains(&format!("received fatal alert: {a}"))),
            "{port} port, certificate {stem}: expected one of the alerts {alert:?}, got {refusal}"
        );
        let r = h2_call(addr, cfg, req, limit).await;
        assert!(r.is_err(), "{port} port served a request made with {stem}: {r:?}");
    }

    // Plaintext: never an HTTP answer; the server closes (after a TLS alert at most).
    for (port, addr) in [("API", &api), ("peer", &peer)] {
        for (what, bytes) in [
            ("HTTP/1.1", &b"GET /livez HTTP/1.1\r\nHost: localhost\r\n\r\n"[..]),
            (
                "HTTP/2 prior knowledge",
                &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0"[..],
            ),
        ] {
            let (got, closed) = raw_exchange(addr, bytes);
            eprintln!("{port} port, plaintext {what}: {got:02x?}, closed: {closed}");
            assert!(
                !got.starts_with(b"HTTP/"),
                "{port} port answered plaintext {what} with HTTP"
            );
            assert!(
                got.is_empty() || got[0] == 0x15,
                "{port} port: {got:02x?} is not a TLS alert"
            );
            assert!(closed, "{port} port kept a plaintext {what} connection open");
        }
    }

    // TLS 1.0 and 1.1: a protocol_version alert (or a close), never a
    // ServerHello. The same hello as TLS 1.2 gets one.
    for (port, addr) in [("API", &api), ("peer", &peer)] {
        let (got, _) = raw_exchange(addr, &client_hello(0x0303));
        assert!(
            got.len() >= 6 && got[0] == 0x16 && got[5] == 0x02,
            "{port} port: the TLS 1.2 control hello got {got:02x?}, not a ServerHello"
        );
        for (name, version) in [("TLS 1.0", 0x0301), ("TLS 1.1", 0x0302)] {
            let (got, closed) = raw_exchange(addr, &client_hello(version));
            eprintln!("{port} port, {name} hello: {got:02x?}, closed: {closed}");
            assert!(closed, "{port} port kept a {name} connection open");
            // An alert record: fatal (2), protocol_version (70).
            assert!(
                got.is_empty() || (got.len() >= 7 && got[0] == 0x15 && got[5] == 2 && got[6] == 70),
                "{port} port answered a {name} hello with {got:02x?}"
            );
        }
    }

    // Nothing of this hurt the node.
    let w = c.put(1, "after-tls", &json!(1)).await.unwrap();
    assert_eq!(w.status, 201, "{:?}", w.body);
}

/// `{"error": {"code": code, "message": non-empty}}`.
fn assert_error(what: &str, status: u16, body: &Value, want_status: u16, code: &str) {
    assert_eq!(status, want_status, "{what}: {body}");
    assert_eq!(body["error"]["code"], code, "{what}: {body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(!message.is_empty(), "{what}: no message in {body}");
}

async fn send(r: reqwest::RequestBuilder) -> (u16, Value) {
    let r = r.timeout(Duration::from_secs(60)).send().await.expect("request");
    let status = r.status().as_u16();
    let body = serde_json::from_slice(&r.bytes().await.unwrap_or_default()).unwrap_or(Value::Null);
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_refuses_admin_calls_and_bad_bodies_and_writes_nothing() {
    let c = TestCluster::start(1);
    c.wait_leader().await;
    let url = |p: &str| c.url(1, p);
    let members_before = c.members(1).await["members"].clone();
    let anon = {
        let mut roots = rustls::RootCertStore::empty();
        let pem = std::fs::read(c.certs.join("ca.pem")).unwrap();
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        reqwest::Client::builder().use_preconfigured_tls(cfg).build().unwrap()
    };

    // Admin calls: a client certificate gets 403, none gets 401, and nothing happens.
    let add = json!({"id": 9, "raft_addr": "127.0.0.1:1", "api_addr": "127.0.0.1:2"});
    let admin_calls: Vec<(reqwest::Method, &str, Option<Value>)> = vec![
        (reqwest::Method::GET, "/admin/members", None),
        (reqwest::Method::POST, "/admin/members", Some(add.clone())),
        (reqwest::Method::DELETE, "/admin/members/1?force=true", None),
        (reqwest::Method::POST, "/admin/members/1/promote", None),
        (reqwest::Method::POST, "/admin/transfer-leader", Some(json!({}))),
        (reqwest::Method::POST, "/admin/snapshot", None),
        (reqwest::Method::GET, "/admin/snapshot", None),
        (reqwest::Method::POST, "/ha/shutdown", None),
        (reqwest::Method::POST, "/cluster/join", Some(add)),
    ];
    for (method, path, body) in &admin_calls {
        for (who, client, status, code) in [
            ("client certificate", &c.client, 403, "forbidden"),
            ("no certificate", &anon, 401, "unauthenticated"),
        ] {
            let mut r = client.request(method.clone(), url(path));
            if let Some(b) = body {
                r = r.json(b);
            }
            let (s, b) = send(r).await;
            assert_error(&format!("{method} {path} with {who}"), s, &b, status, code);
        }
    }
    assert_eq!(c.members(1).await["members"], members_before, "membership changed");
    assert!(c.exited(1).is_none(), "/ha/shutdown from a client stopped the node");

    // A 20 MiB body, with a declared length and streamed without one: 413
    // before it is all read, and the node goes on serving.
    let big = [&b"\""[..], &vec![b'a'; 20 << 20], b"\""].concat();
    let (s, b) = send(c.client.put(url("/v1/kv/hostile/big")).body(big.clone())).await;
    assert_error("20 MiB PUT", s, &b, 413, "body_too_large");
    eprintln!("20 MiB PUT: {b}");
    let chunks: Vec<Result<Bytes, std::io::Error>> =
        big.chunks(1 << 20).map(|p| Ok(Bytes::copy_from_slice(p))).collect();
    let streamed = reqwest::Body::wrap_stream(futures::stream::iter(chunks));
    let (s, b) = send(c.client.put(url("/v1/kv/hostile/big-streamed")).body(streamed)).await;
    assert_error("20 MiB streamed PUT", s, &b, 413, "body_too_large");
    let (s, b) = send(c.client.post(url("/v1/txn")).body(vec![b' '; 2 << 20])).await;
    assert_error("2 MiB transaction", s, &b, 413, "body_too_large");

    // Malformed JSON, whatever the content type says: 400, nothing written.
    let deep = "[".repeat(100_000);
    let bad_bodies: Vec<(&str, &str, Vec<u8>)> = vec![
        ("truncated JSON", "application/json", b"{\"a\":".to_vec()),
        ("invalid UTF-8", "application/json", vec![b'"', 0xff, 0xfe, b'"']),
        ("empty body", "application/json", Vec::new()),
        ("100,000 nested arrays", "application/json", deep.clone().into_bytes()),
        ("XML", "application/xml", b"<value>1</value>".to_vec()),
        ("a form", "application/x-www-form-urlencoded", b"value=1&x=2".to_vec()),
    ];
    for (i, (what, ctype, body)) in bad_bodies.iter().enumerate() {
        let r = c
            .client
            .put(url(&format!("/v1/kv/hostile/bad-{i}")))
            .header("content-type", *ctype);
        let (s, b) = send(r.body(body.clone())).await;
        assert_error(what, s, &b, 400, "invalid_json");
    }
    // The typed routes refuse the same, and values of the wrong shape.
    for (what, path, body) in [
        ("a worker as XML", "/v1/workers/w1", b"<worker/>".to_vec()),
        (
            "a worker with a numeric url",
            "/v1/workers/w1",
            br#"{"url": 5, "models": ["m"]}"#.to_vec(),
        ),
        (
            "a worker with an unknown field",
            "/v1/workers/w1",
            br#"{"url": "http://w", "models": ["m"], "evil": 1}"#.to_vec(),
        ),
        (
            "nested arrays as a policy",
            "/v1/policies/p1",
            deep.clone().into_bytes(),
        ),
    ] {
        let r = c.client.put(url(path)).header("content-type", "application/json");
        let (s, b) = send(r.body(body)).await;
        assert_eq!(s, 400, "{what}: {b}");
        assert!(b["error"]["code"].is_string(), "{what}: {b}");
    }
    let (s, b) = send(c.client.post(url("/v1/txn")).body(deep.into_bytes())).await;
    assert_eq!(s, 400, "nested arrays as a transaction: {b}");

    // Nothing was written, and the node still serves.
    assert!(
        c.list(1, "hostile/", false).await.is_empty(),
        "a refused body was written"
    );
    for path in ["/v1/workers/w1", "/v1/policies/p1"] {
        let (s, b) = send(c.client.get(url(path))).await;
        assert_eq!(s, 404, "{path}: {b}");
    }
    let w = c.put(1, "hostile/ok", &json!({"fine": true})).await.unwrap();
    assert_eq!(w.status, 201, "{:?}", w.body);
    assert_eq!(c.list(1, "hostile/", false).await.len(), 1);
}

/// The encoding of `req`, with the command `Heartbeat { id: MARKER }` in it
/// replaced by `depth` transactions nested in one another. Built from the
/// bytes of one level: a value that deep cannot even be encoded without
/// overflowing the encoder's stack.
fn nested_txn_bomb(encoded: &[u8], depth: usize) -> Vec<u8> {
    const MARKER: &str = "MARKER-MARKER";
    let enc = |c: &Command| wire::encode(c).unwrap();
    let leaf = enc(&Command::Heartbeat { id: MARKER.into() });
    let txn = |success| {
        Command::Txn(Txn {
            compares: vec![],
            success,
            failure: vec![],
        })
    };
    let (one, empty) = (enc(&txn(vec![Command::Expire])), enc(&txn(vec![])));
    let expire = enc(&Command::Expire);
    let pos = one.len() - (empty.len() - expire.len()) / 3 - expire.len();
    let (prefix, suffix) = (&one[..pos], &one[pos + expire.len()..]);
    let at = encoded
        .windows(leaf.len())
        .position(|w| w == &leaf[..])
        .expect("marker command in the message");
    [
        &encoded[..at],
        &prefix.repeat(depth),
        &expire,
        &suffix.repeat(depth),
        &encoded[at + leaf.len()..],
    ]
    .concat()
}

fn marker_request() -> Request {
    Request {
        time_ms: 0,
        idempotency_key: None,
        command: Command::Heartbeat {
            id: "MARKER-MARKER".into(),
        },
    }
}

/// Deterministic pseudo-random bytes (xorshift64).
fn noise(seed: u64, n: usize) -> Bytes {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_port_answers_garbage_from_a_node_certificate_with_errors_and_keeps_serving() {
    let c = TestCluster::start(3);
    let leader = c.wait_leader().await;
    keel::cert::create_node(&c.certs, 7, &[], &CertOptions::default(), false).unwrap();
    let node7 = tls(&c.certs, &c.certs, "node-7");
    let limit = Duration::from_secs(60);

    // Sanity of the bomb builder: shallow nesting decodes as a request.
    let shallow = nested_txn_bomb(&wire::encode(&marker_request()).unwrap(), 2);
    assert!(wire::decode::<Request>(&shallow).is_ok());
    let bomb_write: Bytes = nested_txn_bomb(&wire::encode(&marker_request()).unwrap(), 200_000).into();
    let append = openraft::raft::AppendEntriesRequest::<keel_storage::TypeConfig> {
        vote: keel_storage::types::Vote::new(0, 7),
        prev_log_id: None,
        entries: vec![openraft::entry::RaftEntry::new_normal(
            keel_storage::types::LogId::new(openraft::impls::leader_id_adv::LeaderId { term: 0, node_id: 7 }, 1),
            marker_request(),
        )],
        leader_commit: None,
    };
    let bomb_append: Bytes = nested_txn_bomb(&wire::encode(&append).unwrap(), 200_000).into();

    let decoded_routes = [
        wire::PATH_APPEND,
        wire::PATH_VOTE,
        wire::PATH_PRE_VOTE,
        wire::PATH_TRANSFER_LEADER,
        wire::PATH_FORWARD_WRITE,
        wire::PATH_FORWARD_WRITES,
        wire::PATH_API_FORWARD,
        wire::PATH_SNAPSHOT_OFFER,
    ];
    // A bincode length prefix (varint u64 marker 253) claiming 2^63 bytes.
    let huge_len = Bytes::from_static(&[0, 1, 253, 0, 0, 0, 0, 0, 0, 0, 0x80]);
    for id in [1, 2, 3] {
        let addr = c.nodes[&id].raft_addr.clone();
        let call = |path: &str, body: Bytes| {
            h2_call(
                &addr,
                node7.clone(),
                peer_req(&addr, &c.cluster_name, 7, path, body),
                limit,
            )
        };
        for (i, path) in decoded_routes.iter().enumerate() {
            for (what, body) in [
                ("random bytes", noise(i as u64 + 1, 64 << 10)),
                ("one byte", Bytes::from_static(&[0xff])),
                ("an empty body", Bytes::new()),
                ("a huge declared length", huge_len.clone()),
            ] {
                let r = call(path, body).await;
                assert_eq!(r.as_ref().map(|r| r.0), Ok(400), "node {id} {path}, {what}: {r:?}");
            }
        }
        for (path, body) in [
            (wire::PATH_FORWARD_WRITE, &bomb_write),
            (wire::PATH_APPEND, &bomb_append),
        ] {
            let r = call(path, body.clone()).await;
            let text = r.as_ref().map(|r| String::from_utf8_lossy(&r.1).to_string());
            assert_eq!(
                r.as_ref().map(|r| r.0),
                Ok(400),
                "node {id} {path}, nested transactions: {text:?}"
            );
            assert!(text.unwrap().contains("nested more than"));
        }
        // A batch of relayed writes over the limit: refused whole, naming it.
        let too_many: Vec<Request> = (0..=wire::MAX_FORWARD_BATCH).map(|_| marker_request()).collect();
        let r = call(wire::PATH_FORWARD_WRITES, wire::encode(&too_many).unwrap().into()).await;
        let text = r.as_ref().map(|r| String::from_utf8_lossy(&r.1).to_string());
        assert_eq!(r.as_ref().map(|r| r.0), Ok(400), "node {id} oversized batch: {text:?}");
        assert!(text.unwrap().contains(&format!("at most {}", wire::MAX_FORWARD_BATCH)));
        // Snapshot data with an envelope length of 4 GiB, and random bytes.
        for body in [
            Bytes::from_static(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3]),
            noise(99, 64 << 10),
        ] {
            let r = call(wire::PATH_SNAPSHOT, body).await;
            assert_eq!(r.as_ref().map(|r| r.0), Ok(400), "node {id} snapshot garbage: {r:?}");
        }
        // An append stream whose first frame claims 4 GiB, and one of random
        // bytes: the stream ends without a single result.
        let mut framed_noise = (64u32 << 10).to_le_bytes().to_vec();
        framed_noise.extend_from_slice(&noise(7, 64 << 10));
        for body in [Bytes::from_static(&[0xff, 0xff, 0xff, 0xff, 0]), framed_noise.into()] {
            let r = call(wire::PATH_STREAM_APPEND, body).await;
            match r {
                Ok((_, results)) => assert!(results.is_empty(), "node {id}: results for a garbage stream"),
                Err(e) => eprintln!("node {id}: garbage append stream ended with {e}"),
            }
        }
        for id in [1, 2, 3] {
            assert!(c.exited(id).is_none(), "node {id} died: {}", c.log_tail(id));
        }
    }
    // A body over the 64 MiB message limit: refused with 413 once the limit
    // is passed, on the leader.
    let addr = c.nodes[&leader].raft_addr.clone();
    let over = Bytes::from(vec![0u8; wire::MAX_MESSAGE + (1 << 20)]);
    let r = h2_call(
        &addr,
        node7.clone(),
        peer_req(&addr, &c.cluster_name, 7, wire::PATH_APPEND, over),
        limit,
    )
    .await;
    match &r {
        Ok((s, _)) => assert_eq!(*s, 413, "over-limit append"),
        // The server may reset the rest of the upload after answering.
        Err(e) => eprintln!("over-limit append: {e}"),
    }

    for id in [1, 2, 3] {
        assert!(c.exited(id).is_none(), "node {id} died: {}", c.log_tail(id));
    }
    let after = c.wait_leader().await;
    eprintln!("leader before: {leader}, after: {after}");
    for id in [1, 2, 3] {
        let w = c.put(id, &format!("after-garbage-{id}"), &json!(id)).await.unwrap();
        assert_eq!(w.status, 201, "write through node {id}: {:?}", w.body);
    }
}

/// What a rapid reset flood did.
#[derive(Debug, Default)]
struct Flood {
    /// Streams opened and reset at once, delivered (a PING round trip after
    /// them came back, so the server read every frame before it).
    delivered: usize,
    /// Connections opened.
    connections: usize,
    /// Connections the server closed on us (GOAWAY or a reset connection).
    closed_by_server: usize,
}

/// Opens up to `streams` HTTP/2 streams on `addr`, resetting each right
/// after its HEADERS (rapid reset), with a PING round trip after every batch
/// so the count is of frames the server has read; reconnects whenever the
/// server closes the connection, and stops after `budget`.
async fn rapid_reset(
    addr: &str,
    cfg: Arc<rustls::ClientConfig>,
    mk: &dyn Fn() -> hyper::Request<()>,
    streams: usize,
    budget: Duration,
) -> Flood {
    const BATCH: usize = 50;
    let start = Instant::now();
    let mut f = Flood::default();
    while f.delivered < streams && start.elapsed() < budget {
        let connect = async {
            let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let s = tokio_rustls::TlsConnector::from(cfg.clone())
                .connect(name, tcp)
                .await
                .ok()?;
            h2::client::handshake(s).await.ok()
        };
        let Ok(Some((mut client, mut conn))) = tokio::time::timeout(Duration::from_secs(10), connect).await else {
            continue;
        };
        f.connections += 1;
        let mut pinger = conn.ping_pong().expect("a fresh connection has its ping handle");
        let (done_tx, mut done) = tokio::sync::oneshot::channel::<()>();
        let driver = tokio::spawn(async move {
            let _ = conn.await;
            let _ = done_tx.send(());
        });
        'conn: while f.delivered < streams && start.elapsed() < budget {
            for _ in 0..BATCH {
                let Ok(Ok(ready)) = tokio::time::timeout(Duration::from_secs(5), client.ready()).await else {
                    break 'conn;
                };
                client = ready;
                let Ok((_resp, mut stream)) = client.send_request(mk(), false) else {
                    break 'conn;
                };
                stream.send_reset(h2::Reason::CANCEL);
            }
            match tokio::time::timeout(Duration::from_secs(10), pinger.ping(h2::Ping::opaque())).await {
                Ok(Ok(_pong)) => f.delivered += BATCH,
                _ => break 'conn,
            }
        }
        // Closed by the server (GOAWAY), or still open at the end of the flood.
        if tokio::time::timeout(Duration::from_millis(200), &mut done)
            .await
            .is_ok()
        {
            f.closed_by_server += 1;
        }
        driver.abort();
    }
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_rapid_reset_floods_leave_the_node_serving_with_bounded_memory() {
    let c = TestCluster::start(1);
    c.wait_leader().await;
    keel::cert::create_node(&c.certs, 7, &[], &CertOptions::default(), false).unwrap();
    let pid = c.nodes[&1].pid().unwrap();
    let (api, peer) = (c.nodes[&1].api_addr.clone(), c.nodes[&1].raft_addr.clone());
    // Warm up (connection pools, allocator arenas), then take the baseline.
    for i in 0..20 {
        let w = c.put(1, &format!("warm-{i}"), &json!(i)).await.unwrap();
        assert_eq!(w.status, 201);
    }
    let cluster = c.cluster_name.clone();
    type MakeRequest = Box<dyn Fn() -> hyper::Request<()>>;
    let floods: [(&str, &str, Arc<rustls::ClientConfig>, MakeRequest); 2] = [
        (
            "API",
            &api,
            tls(&c.certs, &c.certs, "client-dev"),
            Box::new({
                let api = api.clone();
                move || hyper::Request::get(format!("https://{api}/status")).body(()).unwrap()
            }),
        ),
        (
            "peer",
            &peer,
            tls(&c.certs, &c.certs, "node-7"),
            Box::new({
                let (peer, cluster) = (peer.clone(), cluster.clone());
                move || {
                    hyper::Request::post(format!("https://{peer}{}", wire::PATH_VOTE))
                        .header(wire::HDR_CLUSTER, cluster.as_str())
                        .header(wire::HDR_FROM, "7")
                        .body(())
                        .unwrap()
                }
            }),
        ),
    ];
    for (port, addr, cfg, mk) in floods {
        let before = rss_kib(pid);
        let started = Instant::now();
        let flood = rapid_reset(addr, cfg, &*mk, 20_000, Duration::from_secs(30)).await;
        let took = started.elapsed();
        let sent = flood.delivered;
        // Still serving: a write and a linearizable read answer.
        let w = c.put(1, &format!("after-{port}-flood"), &json!(sent)).await.unwrap();
        assert_eq!(w.status, 201, "{port} flood: {:?}", w.body);
        let r = c.get(1, &format!("after-{port}-flood"), false).await.unwrap();
        assert_eq!(r.body["value"], json!(sent));
        let after = rss_kib(pid);
        eprintln!(
            "{port} port: {flood:?} in {took:.1?}; RSS {} MiB before, {} MiB after",
            before / 1024,
            after / 1024
        );
        assert!(
            sent >= 1_000,
            "{port} flood sent only {sent} streams: the test did not flood"
        );
        assert!(
            after < before + 100 * 1024,
            "{port} flood grew RSS from {before} KiB to {after} KiB"
        );
        assert!(c.exited(1).is_none(), "the node died: {}", c.log_tail(1));
    }
}
