//! Mutual TLS for the replication link.
//!
//! `keygen` writes, into one directory: `ca.pem`/`ca.key` (the deployment's
//! own certificate authority), `backup.pem`/`backup.key` (server, names
//! `remus-backup` and `localhost`) and `primary.pem`/`primary.key`
//! (client). Each side trusts only certificates signed by that CA; a peer
//! without one is refused during the handshake.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::LinkError;

/// Name the backup's certificate is issued for; primaries connect with it.
pub const SERVER_NAME: &str = "remus-backup";
/// ALPN protocol id of the replication link.
pub const ALPN: &[u8] = b"remus/1";

/// A certificate chain and its private key.
pub struct Identity {
    /// Leaf first.
    pub certs: Vec<CertificateDer<'static>>,
    /// The leaf's key.
    pub key: PrivateKeyDer<'static>,
}

/// Where the TLS files of a data directory live.
#[derive(Debug, Clone)]
pub struct TlsDir(pub PathBuf);

impl TlsDir {
    /// The CA certificate.
    #[must_use]
    pub fn ca(&self) -> PathBuf {
        self.0.join("ca.pem")
    }

    /// Certificate and key of `role` (`backup` or `primary`).
    #[must_use]
    pub fn pair(&self, role: &str) -> (PathBuf, PathBuf) {
        (self.0.join(format!("{role}.pem")), self.0.join(format!("{role}.key")))
    }

    /// True when every file exists.
    #[must_use]
    pub fn is_complete(&self) -> bool {
        let (a, b) = self.pair("backup");
        let (c, d) = self.pair("primary");
        [self.ca(), a, b, c, d].iter().all(|p| p.exists())
    }

    /// Loads the identity of `role`.
    ///
    /// # Errors
    /// [`LinkError::Tls`] naming the unreadable or invalid file.
    pub fn identity(&self, role: &str) -> Result<Identity, LinkError> {
        let (cert, key) = self.pair(role);
        Ok(Identity { certs: read_certs(&cert)?, key: read_key(&key)? })
    }

    /// Loads the CA as a root store.
    ///
    /// # Errors
    /// [`LinkError::Tls`] naming the unreadable or invalid file.
    pub fn roots(&self) -> Result<rustls::RootCertStore, LinkError> {
        let mut roots = rustls::RootCertStore::empty();
        for c in read_certs(&self.ca())? {
            roots.add(c).map_err(|e| LinkError::Tls(format!("{}: {e}", self.ca().display())))?;
        }
        Ok(roots)
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, LinkError> {
    let data = fs::read(path).map_err(|e| LinkError::Tls(format!("{}: {e}", path.display())))?;
    let certs = rustls_pemfile::certs(&mut data.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| LinkError::Tls(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(LinkError::Tls(format!("{}: no certificate found", path.display())));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, LinkError> {
    let data = fs::read(path).map_err(|e| LinkError::Tls(format!("{}: {e}", path.display())))?;
    rustls_pemfile::private_key(&mut data.as_slice())
        .map_err(|e| LinkError::Tls(format!("{}: {e}", path.display())))?
        .ok_or_else(|| LinkError::Tls(format!("{}: no private key found", path.display())))
}

/// Writes a fresh CA and backup/primary certificates into `dir`.
///
/// # Errors
/// [`LinkError::Tls`] when generation fails, [`LinkError::Io`] when the
/// files cannot be written.
pub fn keygen(dir: &Path) -> Result<(), LinkError> {
    let tls = |e: rcgen::Error| LinkError::Tls(e.to_string());
    fs::create_dir_all(dir)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(tls)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "remus CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_key = KeyPair::generate().map_err(tls)?;
    let ca_cert = ca.self_signed(&ca_key).map_err(tls)?;
    let td = TlsDir(dir.to_path_buf());
    write_private(&td.0.join("ca.key"), &ca_key.serialize_pem())?;
    fs::write(td.ca(), ca_cert.pem())?;
    for (role, names, usage) in [
        ("backup", vec![SERVER_NAME.to_string(), "localhost".to_string()], ExtendedKeyUsagePurpose::ServerAuth),
        ("primary", vec!["remus-primary".to_string()], ExtendedKeyUsagePurpose::ClientAuth),
    ] {
        let mut p = CertificateParams::new(names).map_err(tls)?;
        p.distinguished_name.push(DnType::CommonName, format!("remus {role}"));
        p.extended_key_usages = vec![usage];
        let key = KeyPair::generate().map_err(tls)?;
        let cert = p.signed_by(&key, &ca_cert, &ca_key).map_err(tls)?;
        let (c, k) = td.pair(role);
        write_private(&k, &key.serialize_pem())?;
        fs::write(c, cert.pem())?;
    }
    Ok(())
}

fn write_private(path: &Path, pem: &str) -> Result<(), LinkError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new().create(true).truncate(true).write(true).mode(0o600).open(path)?;
    f.write_all(pem.as_bytes())?;
    Ok(())
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// QUIC server config for the backup: presents `id`, demands a client
/// certificate signed by a CA in `roots`.
///
/// # Errors
/// [`LinkError::Tls`] when the key or certificates are unusable.
pub fn server_config(id: Identity, roots: rustls::RootCertStore) -> Result<quinn::ServerConfig, LinkError> {
    let tls = |e: rustls::Error| LinkError::Tls(e.to_string());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| LinkError::Tls(e.to_string()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.certs, id.key)
        .map_err(tls)?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    let q = quinn::crypto::rustls::QuicServerConfig::try_from(cfg).map_err(|e| LinkError::Tls(e.to_string()))?;
    let mut sc = quinn::ServerConfig::with_crypto(Arc::new(q));
    sc.transport_config(Arc::new(crate::driver::transport_config(crate::driver::Congestion::default(), None)));
    Ok(sc)
}

/// QUIC client config for the primary: trusts `roots`, presents `id`
/// (`None` only to test that the backup refuses such a client).
///
/// # Errors
/// [`LinkError::Tls`] when the key or certificates are unusable.
pub fn client_config(id: Option<Identity>, roots: rustls::RootCertStore) -> Result<quinn::ClientConfig, LinkError> {
    let tls = |e: rustls::Error| LinkError::Tls(e.to_string());
    let b = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .with_root_certificates(roots);
    let mut cfg = match id {
        Some(id) => b.with_client_auth_cert(id.certs, id.key).map_err(tls)?,
        None => b.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    let q = quinn::crypto::rustls::QuicClientConfig::try_from(cfg).map_err(|e| LinkError::Tls(e.to_string()))?;
    let mut cc = quinn::ClientConfig::new(Arc::new(q));
    cc.transport_config(Arc::new(crate::driver::transport_config(crate::driver::Congestion::default(), None)));
    Ok(cc)
}
