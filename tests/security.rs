//! Security through the real binary: TLS and mutual TLS (`[server.tls]`), with certificates
//! made for the test (a CA, a server certificate for 127.0.0.1, a client certificate).

mod common;

use std::path::Path;

use common::{Daemon, with_config};
use ferry_client::{Client, Message, Tls};
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType,
};

/// PEM files: `ca.pem`, `server.pem` / `server.key`, `client.pem` / `client.key` in `dir`.
fn make_certificates(dir: &Path) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    for (name, purpose) in [
        ("server", ExtendedKeyUsagePurpose::ServerAuth),
        ("client", ExtendedKeyUsagePurpose::ClientAuth),
    ] {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        params.extended_key_usages = vec![purpose];
        let cert = params.signed_by(&key, &issuer).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
}

fn tls(dir: &Path, with_identity: bool) -> Tls {
    let read = |name: &str| std::fs::read(dir.join(name)).unwrap();
    Tls {
        ca_pem: read("ca.pem"),
        identity: with_identity.then(|| (read("client.pem"), read("client.key"))),
        domain: None,
    }
}

/// Runs the `ferry` binary: its exit code and standard output.
fn ferry(args: &[&str]) -> (Option<i32>, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    (output.status.code(), stdout)
}

#[tokio::test]
async fn mutual_tls_lets_in_only_clients_with_a_certificate_the_ca_signed() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path();
    make_certificates(certs);
    let path = |name: &str| certs.join(name).display().to_string();
    let config = format!(
        "[server.tls]\ncert_file = {:?}\nkey_file = {:?}\nclient_ca_file = {:?}\n",
        path("server.pem"),
        path("server.key"),
        path("ca.pem")
    );
    let daemon = Daemon::start_in(certs, with_config(certs, &config)).await;
    let url = daemon.url.replace("http://", "https://");

    // With its certificate, a client does everything over TLS.
    let client = Client::connect_tls(url.clone(), tls(certs, true))
        .await
        .unwrap();
    client.create_channel("orders").await.unwrap();
    let options = ferry_client::SubscriptionOptions::default();
    client
        .create_subscription("orders", "billing", options)
        .await
        .unwrap();
    client
        .publish("orders", vec![Message::new("secret")])
        .await
        .unwrap();
    let mut deliveries = client.subscribe("orders", "billing");
    let delivery = deliveries.next().await.unwrap().unwrap();
    assert_eq!(&delivery.payload[..], b"secret");
    delivery.ack().await.unwrap();

    // Without one, or in plaintext, nothing gets through.
    let anonymous = Client::connect_tls(url.clone(), tls(certs, false)).await;
    let refused = match anonymous {
        Ok(client) => client.channels().await.map(drop),
        Err(e) => Err(e),
    };
    assert!(
        refused.is_err(),
        "a client without a certificate was let in"
    );
    let plaintext = Client::connect(daemon.url.clone()).await;
    let refused = match plaintext {
        Ok(client) => client.channels().await.map(drop),
        Err(e) => Err(e),
    };
    assert!(refused.is_err(), "a plaintext client was let in");

    // The command line and the health check speak TLS too.
    let (ca, cert, key) = (path("ca.pem"), path("client.pem"), path("client.key"));
    let with_identity = [
        "--server",
        &url,
        "--tls-ca",
        &ca,
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
    ];
    let (code, out) = ferry(&[&["channels", "list"][..], &with_identity[..]].concat());
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("orders"), "{out}");
    let (code, _) = ferry(&[&["health"][..], &with_identity[..]].concat());
    assert_eq!(code, Some(0));
    let (code, _) = ferry(&["channels", "list", "--server", &url, "--tls-ca", &ca]);
    assert_eq!(code, Some(3), "refused without a client certificate");
    daemon.stop().await;

    // Mutual TLS authenticates clients: serving beyond loopback needs no
    // allow_unauthenticated (checked without binding anything).
    let open = certs.join("open.toml");
    let exposed = format!("[server]\nlisten = \"0.0.0.0:50051\"\n{config}");
    std::fs::write(&open, exposed).unwrap();
    let (code, out) = ferry(&["config", "check", open.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{out}");
    std::fs::remove_file(certs.join("server.key")).unwrap();
    let (code, _) = ferry(&["config", "check", open.to_str().unwrap()]);
    assert_eq!(
        code,
        Some(2),
        "a TLS file that is not there is named at once"
    );
}

#[tokio::test]
async fn an_ack_id_counts_only_on_the_stream_that_received_it() {
    let daemon = Daemon::start().await;
    daemon.create("orders", &[("billing", 30_000)]).await;
    daemon.publish("orders", [b"x".to_vec()]).await;
    let mut first = common::Consumer::attach(&daemon, "orders", "billing", 10).await;
    let got = first.take(1).await;
    // Another stream of the same subscription cannot settle it.
    let mut second = common::Consumer::attach(&daemon, "orders", "billing", 10).await;
    let ids = common::ack_ids(&got);
    assert_eq!(
        second.ack(ids.clone()).await,
        [ferry_proto::pb::AckStatus::Unknown]
    );
    assert_eq!(
        second.nack(ids.clone()).await,
        [ferry_proto::pb::AckStatus::Unknown]
    );
    assert_eq!(first.ack(ids).await, [ferry_proto::pb::AckStatus::Ok]);
    daemon.stop().await;
}
