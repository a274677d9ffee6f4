//! The peer port accepts only cluster nodes: a client or admin certificate
//! of the same CA, a certificate of another CA, no certificate and
//! plaintext are all refused, and a node may not claim another node's id.

mod common;

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use common::TestCluster;
use http_body_util::Full;
use hyper_util::rt::TokioExecutor;
use hyper_util::rt::TokioIo;
use keel_raft::tls::TlsFiles;
use keel_raft::tls::TlsMaterial;

fn material(dir: &Path, cert: &str, key: &str) -> Arc<rustls::ClientConfig> {
    TlsMaterial::load(&TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join(cert),
        key: dir.join(key),
    })
    .unwrap()
    .client_config(true)
    .unwrap()
}

fn no_client_cert(ca_dir: &Path) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca_dir.join("ca.pem")).unwrap();
    for c in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(cfg)
}

/// Sends a (garbage) vote request claiming to be node `from`; returns the
/// HTTP status, or the error that stopped the exchange.
async fn probe(addr: &str, tls: Option<Arc<rustls::ClientConfig>>, cluster: &str, from: u64) -> Result<u16, String> {
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let req = hyper::Request::post(format!("http://{addr}/raft/vote"))
        .header("x-keel-cluster", cluster)
        .header("x-keel-from", from.to_string())
        .body(Full::new(Bytes::from_static(b"not a vote")))
        .unwrap();
    let builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    let fut = async {
        let resp = match tls {
            Some(cfg) => {
                let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
                let s = tokio_rustls::TlsConnector::from(cfg)
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("tls: {e}"))?;
                let (mut send, conn) = builder
                    .handshake(TokioIo::new(s))
                    .await
                    .map_err(|e| format!("h2: {e}"))?;
                tokio::spawn(conn);
                send.send_request(req).await.map_err(|e| format!("request: {e}"))?
            }
            None => {
                let (mut send, conn) = builder
                    .handshake(TokioIo::new(tcp))
                    .await
                    .map_err(|e| format!("h2: {e}"))?;
                tokio::spawn(conn);
                send.send_request(req).await.map_err(|e| format!("request: {e}"))?
            }
        };
        Ok(resp.status().as_u16())
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), fut)
        .await
        .map_err(|_| "timed out".to_string())?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_port_refuses_everything_but_the_node_it_claims_to_be() {
    let c = TestCluster::start(1);
    c.wait_leader().await;
    let addr = c.nodes[&1].raft_addr.clone();
    let certs = c.certs.clone();
    let other = c.root.path().join("other-ca");
    keel::cert::create_dev_set(&other, &[1, 2]).unwrap();
    // A second node certificate from our CA, for a node that is not running.
    keel::cert::create_node(&certs, 2, &[], &keel::cert::CertOptions::default(), false).unwrap();

    // Control: a genuine node certificate reaches the Raft handler, which
    // rejects the garbage body with 400. This proves the probe can succeed.
    let ok = probe(
        &addr,
        Some(material(&certs, "node-2.pem", "node-2-key.pem")),
        &c.cluster_name,
        2,
    )
    .await;
    assert_eq!(ok, Ok(400), "a real node certificate must reach the peer handler");

    // A node claiming another node's id: refused by the identity check.
    let spoof = probe(
        &addr,
        Some(material(&certs, "node-2.pem", "node-2-key.pem")),
        &c.cluster_name,
        3,
    )
    .await;
    assert_eq!(spoof, Ok(403), "node 2 claiming to be node 3");

    // A right certificate but the wrong cluster name.
    let wrong_cluster = probe(
        &addr,
        Some(material(&certs, "node-2.pem", "node-2-key.pem")),
        "another",
        2,
    )
    .await;
    assert_eq!(wrong_cluster, Ok(412));

    let refused = [
        (
            "client certificate of the same CA",
            Some(material(&certs, "client-dev.pem", "client-dev-key.pem")),
        ),
        (
            "admin certificate of the same CA",
            Some(material(&certs, "admin-dev.pem", "admin-dev-key.pem")),
        ),
        (
            "node certificate of another CA",
            Some(material(&other, "node-2.pem", "node-2-key.pem")),
        ),
        ("no client certificate", Some(no_client_cert(&certs))),
        ("plaintext HTTP/2", None),
    ];
    for (what, tls) in refused {
        let r = probe(&addr, tls, &c.cluster_name, 2).await;
        assert!(
            r.is_err(),
            "{what}: expected the connection to be refused, got HTTP {r:?}"
        );
    }

    // The node still works after all that.
    let w = c.put(1, "after", &serde_json::json!(1)).await.unwrap();
    assert_eq!(w.status, 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_needs_a_certificate_and_admin_calls_an_admin_one() {
    let c = TestCluster::start(1);
    c.wait_leader().await;
    let anon = reqwest::Client::builder()
        .use_preconfigured_tls((*no_client_cert_any_alpn(&c.certs)).clone())
        .build()
        .unwrap();
    // Probes are open (orchestrators call them without certificates)...
    let r = anon.get(c.url(1, "/livez")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // ...everything else needs a certificate.
    let r = anon.get(c.url(1, "/status")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unauthenticated");
    // A client certificate may read status but not admin routes.
    let r = c.client.get(c.url(1, "/admin/state-hash")).send().await.unwrap();
    assert_eq!(r.status(), 403);
    let r = c.admin.get(c.url(1, "/admin/state-hash")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

fn no_client_cert_any_alpn(ca_dir: &Path) -> Arc<rustls::ClientConfig> {
    let cfg = no_client_cert(ca_dir);
    let mut cfg = (*cfg).clone();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(cfg)
}
