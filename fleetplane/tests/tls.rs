//! TLS on the listeners: `wss://` and `https://` (OpAMP and admin) with a
//! real TLS client that trusts only the test CA, and the certificate
//! replaced on disk under a running server.
//!
//! The fixtures in `tests/fixtures/tls/` are a test CA and two server
//! certificates it signed (`fleetplane-test-a`, `fleetplane-test-b`), valid
//! for `localhost` and `127.0.0.1` for a hundred years.

mod common;

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use common::{CONFIGURABLE, Server};
use fleetplane_proto::{InstanceUid, Message, framing, http::CONTENT_TYPE_PROTOBUF, opamp::AgentToServer};
use fleetplane_testkit::wait::eventually;
use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;

const DEADLINE: Duration = Duration::from_secs(30);

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tls")
        .join(name)
}

/// Puts server certificate `which` (a or b) where the server reads it.
fn install(dir: &Path, which: &str) {
    // Written aside and renamed, as a certificate manager would, so the
    // server never reads half a file.
    for (from, to) in [
        (format!("server-{which}.pem"), "tls.pem"),
        (format!("server-{which}.key"), "tls.key"),
    ] {
        let staged = dir.join(format!("{to}.new"));
        std::fs::copy(fixture(&from), &staged).unwrap();
        std::fs::rename(&staged, dir.join(to)).unwrap();
    }
}

/// A TLS connection that trusts only the test CA; also which test
/// certificate the server presented.
async fn connect(addr: SocketAddr) -> (TlsStream<tokio::net::TcpStream>, String) {
    connect_as(addr, None).await.unwrap()
}

/// [`connect`], presenting client certificate `client` (a fixture name
/// such as `client-acme`) if given.
async fn connect_as(
    addr: SocketAddr,
    client: Option<&str>,
) -> std::io::Result<(TlsStream<tokio::net::TcpStream>, String)> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(fixture("ca.pem")).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match client {
        None => builder.with_no_client_auth(),
        Some(name) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(fixture(&format!("{name}.pem")))
                .unwrap()
                .map(Result::unwrap)
                .collect();
            let key = rustls::pki_types::PrivateKeyDer::from_pem_file(fixture(&format!("{name}.key"))).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut stream = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await?;
    // TLS 1.3 reports a refused client certificate after the handshake:
    // a flush makes the refusal show here.
    stream.flush().await?;
    let presented = stream.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    let which = ["a", "b"]
        .into_iter()
        .find(|w| {
            let name = format!("fleetplane-test-{w}");
            presented.windows(name.len()).any(|window| window == name.as_bytes())
        })
        .unwrap_or("?")
        .to_owned();
    Ok((stream, which))
}

/// One HTTP/1.1 request over TLS; the status code and the body.
async fn https(addr: SocketAddr, method: &str, path: &str, content_type: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let (mut stream, _) = connect(addr).await;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response).await;
    let split = response.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let status = std::str::from_utf8(&response[9..12]).unwrap().parse().unwrap();
    (status, response[split + 4..].to_vec())
}

/// An admin API call over TLS as tenant acme; the status and the JSON body.
async fn acme_admin(addr: SocketAddr, method: &str, path: &str) -> (u16, serde_json::Value) {
    acme_admin_with(addr, method, path, "").await
}

/// [`acme_admin`] with a JSON body.
async fn acme_admin_with(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    let (mut stream, _) = connect(addr).await;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nFleetplane-Tenant: acme\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response).await;
    let split = response.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let status = std::str::from_utf8(&response[9..12]).unwrap().parse().unwrap();
    (
        status,
        serde_json::from_slice(&response[split + 4..]).unwrap_or_default(),
    )
}

type Wss = tokio_tungstenite::WebSocketStream<TlsStream<tokio::net::TcpStream>>;

/// Speaks OpAMP over `stream` (wss://): a first full report from a fresh
/// uid; the uid, the socket and the server's answer.
async fn wss_hello(
    stream: TlsStream<tokio::net::TcpStream>,
) -> (InstanceUid, Wss, fleetplane_proto::opamp::ServerToAgent) {
    let (mut socket, _) = tokio_tungstenite::client_async("wss://localhost/v1/opamp", stream)
        .await
        .unwrap();
    let uid = InstanceUid::new_v7();
    let hello = AgentToServer {
        instance_uid: uid.to_vec(),
        sequence_num: 1,
        capabilities: CONFIGURABLE,
        agent_description: Some(Default::default()),
        ..Default::default()
    };
    let reply = exchange(&mut socket, &hello).await;
    (uid, socket, reply)
}

/// Sends one message and returns the server's next message.
async fn exchange(socket: &mut Wss, message: &AgentToServer) -> fleetplane_proto::opamp::ServerToAgent {
    socket
        .send(WsMessage::Binary(framing::encode_ws(message).into()))
        .await
        .unwrap();
    next_message(socket).await
}

/// The server's next OpAMP message on `socket`.
async fn next_message(socket: &mut Wss) -> fleetplane_proto::opamp::ServerToAgent {
    loop {
        let frame = tokio::time::timeout(DEADLINE, socket.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let WsMessage::Binary(bytes) = frame {
            return framing::decode_ws(&bytes, usize::MAX).unwrap();
        }
    }
}

async fn secured(dir: &Path) -> Server {
    install(dir, "a");
    let (cert, key) = (dir.join("tls.pem"), dir.join("tls.key"));
    Server::start_with(tempfile::tempdir().unwrap(), move |c| {
        c.tls.cert_file = Some(cert);
        c.tls.key_file = Some(key);
        c.tls.reload_interval_secs = 1;
    })
    .await
}

#[tokio::test]
async fn wss_and_https_are_served_on_both_listeners() {
    let dir = tempfile::tempdir().unwrap();
    let server = secured(dir.path()).await;
    // OpAMP over wss://.
    let (stream, presented) = connect(server.server.opamp_addr).await;
    assert_eq!(presented, "a");
    let (uid, socket, reply) = wss_hello(stream).await;
    assert!(reply.error_response.is_none(), "{reply:?}");
    assert_eq!(reply.instance_uid, uid.to_vec());
    // OpAMP over https://.
    let poll = AgentToServer {
        instance_uid: InstanceUid::new_v7().to_vec(),
        sequence_num: 1,
        agent_description: Some(Default::default()),
        ..Default::default()
    };
    let (status, body) = https(
        server.server.opamp_addr,
        "POST",
        "/v1/opamp",
        CONTENT_TYPE_PROTOBUF,
        &poll.encode_to_vec(),
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        fleetplane_proto::opamp::ServerToAgent::decode(body.as_slice())
            .unwrap()
            .error_response
            .is_none()
    );
    // The admin API over https:// sees both agents.
    let (status, body) = https(
        server.server.admin_addr,
        "GET",
        "/api/v1/agents",
        "application/json",
        b"",
    )
    .await;
    assert_eq!(status, 200);
    let agents: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(agents.as_array().unwrap().len(), 2, "{agents}");
    // Plain HTTP on a TLS port gets no answer it could take for OpAMP.
    let mut plain = tokio::net::TcpStream::connect(server.server.opamp_addr).await.unwrap();
    plain
        .write_all(b"POST /v1/opamp HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, plain.read_to_end(&mut answer)).await;
    assert!(
        !answer.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    drop(socket);
    server.stop().await;
}

#[tokio::test]
async fn a_certificate_replaced_on_disk_is_served_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = secured(dir.path()).await;
    let (mut before, presented) = connect(server.server.opamp_addr).await;
    assert_eq!(presented, "a");
    install(dir.path(), "b");
    eventually("the new certificate served", DEADLINE, || async {
        let (_, presented) = connect(server.server.opamp_addr).await;
        Ok((presented == "b").then_some(()))
    })
    .await
    .unwrap();
    // A connection made before the swap keeps working.
    before
        .write_all(b"GET /v1/nothing HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = before.read_to_end(&mut answer).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 404"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    // The admin listener serves the new certificate too.
    let (_, presented) = connect(server.server.admin_addr).await;
    assert_eq!(presented, "b");
    server.stop().await;
}

#[tokio::test]
async fn a_bad_certificate_file_stops_the_start_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tls.pem"), "not a certificate").unwrap();
    std::fs::copy(fixture("server-a.key"), dir.path().join("tls.key")).unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut config = common::config(data.path());
    config.tls.cert_file = Some(dir.path().join("tls.pem"));
    config.tls.key_file = Some(dir.path().join("tls.key"));
    let error = fleetplane::AllInOne::start(&config).await.unwrap_err();
    let message = format!("{error:#}");
    assert!(
        message.contains("TLS certificate") && message.contains("tls.pem"),
        "{message}"
    );
}

/// An agent whose client certificate decides its tenant: one CA per tenant.
#[tokio::test]
async fn client_certificates_put_agents_in_their_ca_s_tenant() {
    let dir = tempfile::tempdir().unwrap();
    install(dir.path(), "a");
    let (cert, key) = (dir.path().join("tls.pem"), dir.path().join("tls.key"));
    let server = Server::start_with(tempfile::tempdir().unwrap(), move |c| {
        c.tls.cert_file = Some(cert);
        c.tls.key_file = Some(key);
        c.tls.client_cas = ["acme", "globex"]
            .map(|tenant| fleetplane::config::ClientCaSection {
                tenant: tenant.into(),
                ca_file: fixture(&format!("{tenant}-ca.pem")),
            })
            .to_vec();
        c.agents.auth = fleetplane::config::AgentAuth::ApiKey;
    })
    .await;
    let addr = server.server.opamp_addr;
    let mut uids = Vec::new();
    for tenant in ["acme", "globex"] {
        let (stream, _) = connect_as(addr, Some(&format!("client-{tenant}"))).await.unwrap();
        let (uid, socket, reply) = wss_hello(stream).await;
        assert!(reply.error_response.is_none(), "{tenant}: {reply:?}");
        uids.push((tenant, uid, socket));
    }
    // The admin API is behind TLS too.
    let agents_of = |tenant: &'static str| async move {
        let (mut stream, _) = connect(server.server.admin_addr).await;
        let request = format!(
            "GET /api/v1/agents HTTP/1.1\r\nHost: localhost\r\nFleetplane-Tenant: {tenant}\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = Vec::new();
        let _ = stream.read_to_end(&mut response).await;
        let split = response.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        serde_json::from_slice::<serde_json::Value>(&response[split + 4..]).unwrap()
    };
    for (tenant, uid, _) in &uids {
        let agents = agents_of(tenant).await;
        assert_eq!(agents.as_array().unwrap().len(), 1, "{tenant}: {agents}");
        assert_eq!(agents[0]["instance_uid"], uid.to_string());
    }
    assert_eq!(
        agents_of("default").await,
        serde_json::json!([]),
        "nobody in the default tenant"
    );
    // Neither a certificate nor a key: refused before the upgrade.
    let (stream, _) = connect(addr).await;
    let refused = tokio_tungstenite::client_async("wss://localhost/v1/opamp", stream)
        .await
        .unwrap_err();
    assert!(
        matches!(refused, tokio_tungstenite::tungstenite::Error::Http(ref r) if r.status() == 401),
        "{refused:?}"
    );
    // A certificate from a CA of no tenant does not get through the handshake.
    let stranger = connect_as(addr, Some("server-b")).await;
    let refused_later = match stranger {
        Err(_) => true,
        Ok((mut stream, _)) => {
            let _ = stream
                .write_all(b"GET /v1/opamp HTTP/1.1\r\nHost: localhost\r\n\r\n")
                .await;
            let mut answer = Vec::new();
            let read = tokio::time::timeout(DEADLINE, stream.read_to_end(&mut answer)).await;
            matches!(read, Ok(Err(_))) || answer.is_empty()
        }
    };
    assert!(refused_later, "a certificate of no tenant's CA is refused");
    server.stop().await;
}

/// A TLS server whose tenant acme has an issuing CA (made here, returned with
/// the directory holding it) and trusts both its bootstrap client
/// certificates and the ones that CA issues.
async fn acme_issuing_server() -> (Server, rcgen::Certificate, tempfile::TempDir) {
    use rcgen::{CertificateParams, DnType, IsCa, KeyPair};
    // acme's issuing CA, made here.
    let dir = tempfile::tempdir().unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.distinguished_name.push(DnType::CommonName, "acme agents CA");
    ca_params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let (ca_file, ca_key_file) = (dir.path().join("issuer.pem"), dir.path().join("issuer.key"));
    std::fs::write(&ca_file, ca.pem()).unwrap();
    std::fs::write(&ca_key_file, ca_key.serialize_pem()).unwrap();
    install(dir.path(), "a");
    let (cert, key) = (dir.path().join("tls.pem"), dir.path().join("tls.key"));
    let issuer_ca = ca_file.clone();
    let server = Server::start_with(tempfile::tempdir().unwrap(), move |c| {
        c.tls.cert_file = Some(cert);
        c.tls.key_file = Some(key);
        // Bootstrap certificates and the ones the server issues: both acme's.
        c.tls.client_cas = vec![
            fleetplane::config::ClientCaSection {
                tenant: "acme".into(),
                ca_file: fixture("acme-ca.pem"),
            },
            fleetplane::config::ClientCaSection {
                tenant: "acme".into(),
                ca_file: issuer_ca,
            },
        ];
        c.agents.issuers = vec![fleetplane::config::IssuerSection {
            tenant: "acme".into(),
            ca_cert_file: ca_file,
            ca_key_file,
        }];
        c.agents.auth = fleetplane::config::AgentAuth::ApiKey;
    })
    .await;
    (server, ca, dir)
}

/// A WebSocket over TLS presenting the client certificate `cert` (PEM) with
/// its private key `key` (PEM): what an agent does with the certificate it
/// was offered.
async fn connect_with_certificate(addr: SocketAddr, cert: &[u8], key: &[u8]) -> Wss {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(fixture("ca.pem")).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let chain = vec![CertificateDer::from_pem_slice(cert).unwrap()];
    let private = rustls::pki_types::PrivateKeyDer::from_pem_slice(key).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, private)
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    stream.flush().await.unwrap();
    let (socket, _) = tokio_tungstenite::client_async("wss://localhost/v1/opamp", stream)
        .await
        .expect("admitted on the certificate");
    socket
}

/// Reconnects on a certificate alone and says hello as agent `uid`: the
/// server must take it as its tenant's agent.
async fn back_on_certificate(addr: SocketAddr, cert: &[u8], key: &[u8], uid: InstanceUid, seq: u64, caps: u64) -> Wss {
    let mut socket = connect_with_certificate(addr, cert, key).await;
    let back = AgentToServer {
        instance_uid: uid.to_vec(),
        sequence_num: seq,
        capabilities: caps,
        agent_description: Some(Default::default()),
        ..Default::default()
    };
    let reply = exchange(&mut socket, &back).await;
    assert!(reply.error_response.is_none(), "recognised as acme's: {reply:?}");
    socket
}

/// Server-generated certificates (spec 4.G.36): an operator with the admin
/// role issues an agent a new client certificate; the agent is offered it
/// with its key and the CA at once, reconnects on it alone, and is
/// recognised as acme's. The key is never shown or audited; an agent that
/// cannot take connection settings is refused (409).
#[tokio::test]
async fn an_operator_issues_an_agent_a_certificate_it_reconnects_on() {
    use fleetplane_proto::opamp::AgentCapabilities;

    let (server, ca, _dir) = acme_issuing_server().await;
    let addr = server.server.opamp_addr;
    let admin = server.server.admin_addr;
    let (stream, _) = connect_as(addr, Some("client-acme")).await.unwrap();
    let (uid, mut socket, _) = wss_hello(stream).await;
    let caps = CONFIGURABLE
        | AgentCapabilities::AcceptsOpAmpConnectionSettings as u64
        | AgentCapabilities::ReportsHeartbeat as u64;
    let first = AgentToServer {
        instance_uid: uid.to_vec(),
        sequence_num: 2,
        capabilities: caps,
        ..Default::default()
    };
    assert!(exchange(&mut socket, &first).await.error_response.is_none());

    // Refused for an agent that cannot take connection settings.
    let (stream, _) = connect_as(addr, Some("client-acme")).await.unwrap();
    let (plain, _plain_socket, _) = wss_hello(stream).await;
    let (status, body) = acme_admin(admin, "POST", &format!("/api/v1/agents/{plain}/certificate")).await;
    assert_eq!(status, 409, "{body}");

    let (status, body) = acme_admin(admin, "POST", &format!("/api/v1/agents/{uid}/certificate")).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["delivery"], "pushed");
    let issued = next_certificate_offer(&mut socket).await;
    assert!(
        !issued.private_key.is_empty(),
        "server-generated: the key comes with it"
    );
    assert_eq!(issued.ca_cert, ca.pem().into_bytes());

    // The agent moves to it.
    drop(socket);
    let mut socket = back_on_certificate(addr, &issued.cert, &issued.private_key, uid, 3, caps).await;

    // The key is never shown nor audited.
    let (_, page) = acme_admin(admin, "GET", &format!("/api/v1/agents/{uid}")).await;
    let (_, audit) = acme_admin(admin, "GET", "/api/v1/audit").await;
    for shown in [page.to_string(), audit.to_string()] {
        assert!(!shown.contains("PRIVATE KEY"), "{shown}");
    }
    assert!(audit.to_string().contains("certificate issued"), "{audit}");

    // Rotated again by selector: the agent that can take one gets a new
    // certificate on its connection, the one that cannot is listed.
    let (status, body) = acme_admin_with(admin, "POST", "/api/v1/commands/certificate", r#"{"selector": "*"}"#).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["requested"][0]["instance_uid"], uid.to_string(), "{body}");
    assert_eq!(body["refused"][0]["instance_uid"], plain.to_string(), "{body}");
    let rotated = next_certificate_offer(&mut socket).await;
    assert_ne!(rotated.cert, issued.cert, "a new certificate");
    drop(socket);
    back_on_certificate(addr, &rotated.cert, &rotated.private_key, uid, 4, caps).await;
}

/// The certificate in the next connection-settings offer on `socket`.
async fn next_certificate_offer(socket: &mut Wss) -> fleetplane_proto::opamp::TlsCertificate {
    loop {
        let message = next_message(socket).await;
        if let Some(certificate) = message
            .connection_settings
            .and_then(|c| c.opamp)
            .and_then(|o| o.certificate)
        {
            return certificate;
        }
    }
}

/// The CSR flow end to end (spec 4.G.38): an agent of tenant acme, in on a
/// bootstrap client certificate, sends a certificate request; the server
/// signs it with acme's issuing CA (subject its uid and tenant, private key
/// never sent) and offers it with that CA; the agent reconnects on the new
/// certificate alone and is recognised as acme's. A CSR that names another
/// agent, and one from an agent that cannot take connection settings, are
/// refused with BadRequest.
#[tokio::test]
async fn an_agent_gets_a_certificate_for_its_csr_and_reconnects_on_it() {
    use fleetplane_proto::opamp::{
        AgentCapabilities, CertificateRequest, ConnectionSettingsRequest, OpAmpConnectionSettingsRequest,
        ServerCapabilities, ServerErrorResponseType,
    };
    use rcgen::{CertificateParams, DnType, KeyPair};

    let (server, ca, _dir) = acme_issuing_server().await;
    let addr = server.server.opamp_addr;
    let (stream, _) = connect_as(addr, Some("client-acme")).await.unwrap();
    let (uid, mut socket, hello) = wss_hello(stream).await;
    assert_ne!(
        hello.capabilities & ServerCapabilities::AcceptsConnectionSettingsRequest as u64,
        0,
        "advertised where an issuer is configured"
    );
    let caps = CONFIGURABLE
        | AgentCapabilities::AcceptsOpAmpConnectionSettings as u64
        | AgentCapabilities::ReportsHeartbeat as u64;
    let agent_key = KeyPair::generate().unwrap();
    let csr_for = |cn: String| {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params
            .serialize_request(&agent_key)
            .unwrap()
            .pem()
            .unwrap()
            .into_bytes()
    };
    let request = |seq: u64, caps: u64, csr: Vec<u8>| AgentToServer {
        instance_uid: uid.to_vec(),
        sequence_num: seq,
        capabilities: caps,
        connection_settings_request: Some(ConnectionSettingsRequest {
            opamp: Some(OpAmpConnectionSettingsRequest {
                certificate_request: Some(CertificateRequest { csr }),
            }),
        }),
        ..Default::default()
    };
    // Refused: without AcceptsOpAMPConnectionSettings, and naming another agent.
    let refused = exchange(&mut socket, &request(2, CONFIGURABLE, csr_for(uid.to_uuid_string()))).await;
    let error = refused.error_response.expect("refused");
    assert_eq!(error.r#type, ServerErrorResponseType::BadRequest as i32);
    assert!(
        error.error_message.contains("AcceptsOpAMPConnectionSettings"),
        "{error:?}"
    );
    let refused = exchange(
        &mut socket,
        &request(3, caps, csr_for(InstanceUid::new_v7().to_uuid_string())),
    )
    .await;
    let error = refused.error_response.expect("refused");
    assert!(error.error_message.contains("not this agent"), "{error:?}");
    // Signed.
    let answer = exchange(&mut socket, &request(4, caps, csr_for(uid.to_uuid_string()))).await;
    assert!(answer.error_response.is_none(), "{answer:?}");
    let opamp = answer
        .connection_settings
        .expect("an offer")
        .opamp
        .expect("opamp settings");
    assert!(!opamp.destination_endpoint.is_empty(), "the endpoint restated");
    assert_eq!(opamp.heartbeat_interval_seconds, 30, "and the heartbeat");
    let issued = opamp.certificate.expect("a certificate");
    assert!(issued.private_key.is_empty(), "the key never leaves the agent");
    assert_eq!(issued.ca_cert, ca.pem().into_bytes());
    // The subject's strings sit in the DER as they are.
    let der = CertificateDer::from_pem_slice(&issued.cert).unwrap().to_vec();
    let holds = |text: &str| der.windows(text.len()).any(|w| w == text.as_bytes());
    assert!(
        holds(&uid.to_uuid_string()) && holds("acme"),
        "subject names the agent and its tenant"
    );

    // Reconnect on the issued certificate alone.
    drop(socket);
    back_on_certificate(addr, &issued.cert, agent_key.serialize_pem().as_bytes(), uid, 5, caps).await;
}
