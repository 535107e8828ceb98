//! Security through the real binary: TLS and mutual TLS (`[server.tls]`), with certificates
//! made for the test (a CA, a server certificate for 127.0.0.1, a client certificate).

mod common;

use std::path::Path;

use common::{Daemon, with_config};
use ferry_client::{Client, Message, Tls};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    SanType,
};

/// A certificate authority made for a test.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let pem = params.self_signed(&key).unwrap().pem();
        Ca {
            pem,
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate and its key (PEM) for `common_name`, valid for `localhost` and
    /// 127.0.0.1, for `purpose`; `expired` ones ended in 2020.
    fn sign(
        &self,
        common_name: &str,
        purpose: ExtendedKeyUsagePurpose,
        expired: bool,
    ) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![purpose];
        if expired {
            params.not_before = rcgen::date_time_ymd(2019, 1, 1);
            params.not_after = rcgen::date_time_ymd(2020, 1, 1);
        }
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Writes `NAME.pem` and `NAME.key` in `dir`.
    fn write(&self, dir: &Path, name: &str, purpose: ExtendedKeyUsagePurpose, expired: bool) {
        let (cert, key) = self.sign(name, purpose, expired);
        std::fs::write(dir.join(format!("{name}.pem")), cert).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key).unwrap();
    }
}

/// PEM files: `ca.pem`, `server.pem` / `server.key`, `client.pem` / `client.key` in `dir`.
fn make_certificates(dir: &Path) -> Ca {
    let ca = Ca::new("test CA");
    std::fs::write(dir.join("ca.pem"), &ca.pem).unwrap();
    ca.write(dir, "server", ExtendedKeyUsagePurpose::ServerAuth, false);
    ca.write(dir, "client", ExtendedKeyUsagePurpose::ClientAuth, false);
    ca
}

fn tls(dir: &Path, with_identity: bool) -> Tls {
    tls_as(dir, with_identity.then_some("client"))
}

/// Trusting `ca.pem`, presenting `NAME.pem` if a name is given.
fn tls_as(dir: &Path, identity: Option<&str>) -> Tls {
    let read = |name: &str| std::fs::read(dir.join(name)).unwrap();
    Tls {
        ca_pem: read("ca.pem"),
        identity: identity.map(|name| (read(&format!("{name}.pem")), read(&format!("{name}.key")))),
        domain: None,
    }
}

/// `[server.tls]` on the files `make_certificates` wrote, with the client CA if `mutual`.
fn tls_config(dir: &Path, mutual: bool) -> String {
    let path = |name: &str| dir.join(name).display().to_string();
    let mut config = format!(
        "[server.tls]\ncert_file = {:?}\nkey_file = {:?}\n",
        path("server.pem"),
        path("server.key")
    );
    if mutual {
        config.push_str(&format!("client_ca_file = {:?}\n", path("ca.pem")));
    }
    config
}

/// Whether a client presenting `tls` gets to list channels.
async fn lets_in(url: &str, tls: Tls) -> Result<(), ferry_client::Error> {
    let client = Client::connect_tls(url.to_owned(), tls).await?;
    client.channels().await.map(drop)
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
    // Asking for TLS with an http:// address still speaks TLS (never plaintext, where a token
    // would travel in the clear): this broker accepts nothing else.
    let plain_url = daemon.url.clone();
    let mut over_http = with_identity;
    over_http[1] = &plain_url;
    let (code, out) = ferry(&[&["channels", "list"][..], &over_http[..]].concat());
    assert_eq!(code, Some(0), "{out}");
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

#[tokio::test]
async fn handshakes_refuse_expired_and_foreign_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path();
    let ca = make_certificates(certs);
    ca.write(certs, "expired", ExtendedKeyUsagePurpose::ClientAuth, true);
    let stranger = Ca::new("another CA");
    stranger.write(certs, "foreign", ExtendedKeyUsagePurpose::ClientAuth, false);
    let daemon = Daemon::start_in(certs, with_config(certs, &tls_config(certs, true))).await;
    let url = daemon.url.replace("http://", "https://");

    assert!(lets_in(&url, tls_as(certs, Some("client"))).await.is_ok());
    for refused in ["expired", "foreign"] {
        let outcome = lets_in(&url, tls_as(certs, Some(refused))).await;
        assert!(
            outcome.is_err(),
            "a client certificate that is {refused} was let in"
        );
    }
    // The client checks the broker too: one that trusts another CA will not talk to it.
    std::fs::write(certs.join("other-ca.pem"), &stranger.pem).unwrap();
    let distrusting = Tls {
        ca_pem: stranger.pem.clone().into_bytes(),
        ..tls_as(certs, Some("client"))
    };
    assert!(lets_in(&url, distrusting).await.is_err());
    // Logged (at most once a second, so flooding clients cannot flood the log).
    daemon.wait_for_log("TLS handshake failed", 1).await;
    daemon.stop().await;
}

#[tokio::test]
async fn a_client_certificate_names_its_principal() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path();
    let ca = make_certificates(certs);
    ca.write(certs, "billing", ExtendedKeyUsagePurpose::ClientAuth, false);
    ca.write(certs, "nobody", ExtendedKeyUsagePurpose::ClientAuth, false);
    let config = format!(
        "{}\n[[principals]]\nname = \"billing\"\ncertificates = [\"billing\"]\n\
         publish = [\"orders.>\"]\nadmin = [\"orders.>\"]\n\n\
         [[principals]]\nname = \"ops\"\ncertificates = [\"client\"]\nadmin = [\">\"]\n",
        tls_config(certs, true)
    );
    let daemon = Daemon::start_in(certs, with_config(certs, &config)).await;
    let url = daemon.url.replace("http://", "https://");
    let connect = |name: &'static str| {
        let url = url.clone();
        let tls = tls_as(certs, Some(name));
        async move { Client::connect_tls(url, tls).await.unwrap() }
    };

    let billing = connect("billing").await;
    billing.create_channel("orders.eu").await.unwrap();
    billing
        .publish("orders.eu", vec![Message::new("paid")])
        .await
        .unwrap();
    let refused = billing.create_channel("payments").await.unwrap_err();
    assert_eq!(refused.code(), Some(ferry_client::Code::PermissionDenied));
    assert!(
        refused
            .to_string()
            .contains("principal \"billing\" lacks the admin right"),
        "{refused}"
    );
    connect("client")
        .await
        .create_channel("payments")
        .await
        .unwrap();

    // Signed by the right CA, but naming no principal.
    let refused = connect("nobody").await.channels().await.unwrap_err();
    assert_eq!(refused.code(), Some(ferry_client::Code::Unauthenticated));
    assert!(
        refused.to_string().contains("names no declared principal"),
        "{refused}"
    );

    // Certificate names without mutual TLS could never match: a reload to that is refused and
    // the broker goes on as it was; a start on it is refused.
    let without_client_ca = config.replace(&tls_config(certs, true), &tls_config(certs, false));
    std::fs::write(certs.join("ferry.toml"), &without_client_ca).unwrap();
    common::signal(daemon.pid(), "HUP");
    daemon.wait_for_log("reload refused", 1).await;
    let log = std::fs::read_to_string(&daemon.log).unwrap();
    assert!(log.contains("client_ca_file"), "{log}");
    assert!(connect("billing").await.channels().await.is_ok());
    daemon.stop().await;
    let other = tempfile::tempdir().unwrap();
    let refused = Daemon::try_start_in(other.path(), with_config(other.path(), &without_client_ca))
        .await
        .err()
        .expect("a start with certificate names and no client CA is refused");
    assert!(refused.contains("client_ca_file"), "{refused}");
}

#[tokio::test]
async fn certificates_are_read_again_on_sighup_and_bad_ones_are_not_taken() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path();
    make_certificates(certs);
    let daemon = Daemon::start_in(certs, with_config(certs, &tls_config(certs, false))).await;
    let url = daemon.url.replace("http://", "https://");
    let trusting = |ca: &str| Tls {
        ca_pem: ca.as_bytes().to_vec(),
        identity: None,
        domain: None,
    };
    let first_ca = std::fs::read_to_string(certs.join("ca.pem")).unwrap();
    let before = Client::connect_tls(url.clone(), trusting(&first_ca))
        .await
        .unwrap();
    before.create_channel("orders").await.unwrap();

    // Renewed by another CA: new connections get the new certificate, the open one goes on.
    let renewed = Ca::new("renewed CA");
    renewed.write(certs, "server", ExtendedKeyUsagePurpose::ServerAuth, false);
    common::signal(daemon.pid(), "HUP");
    daemon.wait_for_log("configuration reloaded", 1).await;
    assert!(lets_in(&url, trusting(&renewed.pem)).await.is_ok());
    assert!(lets_in(&url, trusting(&first_ca)).await.is_err());
    assert!(
        before.channels().await.is_ok(),
        "the open connection was kept"
    );

    // A bad key: the reload is refused and the renewed certificate stays in use.
    std::fs::write(certs.join("server.key"), "not a key").unwrap();
    common::signal(daemon.pid(), "HUP");
    daemon.wait_for_log("reload refused", 1).await;
    let log = std::fs::read_to_string(&daemon.log).unwrap();
    assert!(log.contains("no usable PEM private key"), "{log}");
    assert!(lets_in(&url, trusting(&renewed.pem)).await.is_ok());
    daemon.stop().await;
}

/// A client that opens a connection and never finishes its TLS handshake holds up no one, and
/// is cut off after the handshake's 5 s.
#[tokio::test]
async fn a_stalled_handshake_holds_up_no_one_and_is_cut_off() {
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path();
    make_certificates(certs);
    let daemon = Daemon::start_in(certs, with_config(certs, &tls_config(certs, false))).await;
    let address = daemon.url.trim_start_matches("http://").to_owned();
    let url = daemon.url.replace("http://", "https://");

    let opened = std::time::Instant::now();
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
        // The start of a TLS record and no more.
        stream.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
        stalled.push(stream);
    }
    assert!(lets_in(&url, tls(certs, false)).await.is_ok());

    for mut stream in stalled {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(15), stream.read(&mut buf))
            .await
            .expect("the broker cuts a stalled handshake off");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }
    let waited = opened.elapsed();
    assert!(waited >= Duration::from_secs(4), "cut off after {waited:?}");
    daemon.wait_for_log("timed out after 5s", 1).await;
    daemon.stop().await;
}
